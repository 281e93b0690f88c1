"""mesh: an event mesh on NATS JetStream.

What a user program needs: the client, the event and registry models, settings
and the errors. Everything else is reachable through the submodules.
"""

from mesh.client import MeshClient
from mesh.config import Settings, load_settings
from mesh.delivery import Delivery
from mesh.envelope import Event
from mesh.errors import (
    BrokerError,
    BrokerUnavailable,
    ConfigError,
    Conflict,
    DecodeError,
    ExpressionError,
    InvalidName,
    KeyFileError,
    MeshError,
    NotFound,
    PayloadTooLarge,
    PortInUse,
    RequestError,
    RequestTimeout,
    StorageError,
    ValidationError,
)
from mesh.registry import Propagation, PropagationMode, RetryPolicy, Target, TargetKind
from mesh.replies import Reply

__version__ = "0.1.0"

__all__ = [
    "BrokerError",
    "BrokerUnavailable",
    "ConfigError",
    "Conflict",
    "DecodeError",
    "Delivery",
    "Event",
    "ExpressionError",
    "InvalidName",
    "KeyFileError",
    "MeshClient",
    "MeshError",
    "NotFound",
    "PayloadTooLarge",
    "PortInUse",
    "Propagation",
    "PropagationMode",
    "Reply",
    "RequestError",
    "RequestTimeout",
    "RetryPolicy",
    "Settings",
    "StorageError",
    "Target",
    "TargetKind",
    "ValidationError",
    "__version__",
    "load_settings",
]

"""The nats.py names the rest of the mesh may hold: message and subscription types,
the KV handle, the errors and the JetStream API models.

Outside ``mesh/_nats/`` nothing imports ``nats``: a module that needs one of these
names (to annotate a message, to catch a broker error) takes it from here, and every
call into nats.py goes through ``mesh._nats`` (``JetStreamPort`` and its helpers).
``tests/test_seam.py`` checks both.
"""

from __future__ import annotations

import nats
import nats.errors as nats_errors
import nats.js.errors as js_errors
from nats import micro
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    ConsumerInfo,
    DeliverPolicy,
    DiscardPolicy,
    PubAck,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.kv import KeyValue
from nats.micro.request import Request as MicroRequest
from nats.micro.service import Service as MicroService

connect = nats.connect

__all__ = [
    "NATS",
    "AckPolicy",
    "ConsumerConfig",
    "ConsumerInfo",
    "DeliverPolicy",
    "DiscardPolicy",
    "JetStreamContext",
    "KeyValue",
    "MicroRequest",
    "MicroService",
    "Msg",
    "PubAck",
    "RetentionPolicy",
    "StorageType",
    "StreamConfig",
    "Subscription",
    "connect",
    "js_api",
    "js_errors",
    "micro",
    "nats_errors",
]

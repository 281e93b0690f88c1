"""The exceptions mesh raises.

Every error a user can cause or meet is a ``MeshError``; the CLI prints its
message as one line and exits non-zero. The tree::

    MeshError
    ├── ConfigError                 bad settings, key file problems
    │   ├── KeyFileError            missing, corrupt or too-open key file
    │   └── MissingS3Extra          backup/remote.py: aiobotocore is not installed
    ├── ValidationError (ValueError) bad names, types, patterns, data
    │   ├── InvalidName
    │   ├── ExpressionError         a filter or transform that does not compile
    │   ├── PayloadTooLarge         carries size and max_payload
    │   ├── SignatureError          signing.py: missing, stale or wrong signature headers
    │   ├── DestinationRefused      netguard.py: a private or refused target address
    │   ├── ArchiveError            backup/archive.py: a damaged or foreign archive
    │   └── SealError               backup/seal.py: keys that do not open
    ├── NotFound (LookupError)      unknown target, propagation, event
    ├── Conflict                    already exists, not permitted by the registry
    ├── BrokerError                 NATS / JetStream problems
    │   ├── BrokerUnavailable       cannot connect
    │   └── PortInUse               embedded server port taken
    ├── DecodeError                 a message that is not a valid event
    ├── StorageError                database problems
    │   ├── RowsRefused             storage/_common.py: rows the database refuses
    │   └── RemoteError             backup/remote.py: the object store refused or is away
    ├── RequestError                request/reply failed
    │   └── RequestTimeout
    ├── TokenError                  tokens.py: a credential the bridge refuses
    ├── PortalError                 portal.py: a portal link or session refused
    ├── QuotaExceeded               tenants.py: a tenant over a quota
    ├── TransformFailed             transform.py: a transform that failed for one event
    ├── MissingExtra                services/egress/drivers/base.py: a kind's library
    │                               is not installed
    ├── UnknownTopic                services/egress/drivers/kafka.py: no such Kafka topic
    └── LoginRefused                services/egress/drivers/kafka.py: the broker refused
                                    a Kafka target's SASL login (a retry)

``tests/test_seam.py`` checks that every subclass in ``mesh/`` and ``services/`` is
drawn here.
"""

from __future__ import annotations


class MeshError(Exception):
    """Root of every error mesh raises on purpose."""


class ConfigError(MeshError):
    pass


class KeyFileError(ConfigError):
    pass


class ValidationError(MeshError, ValueError):
    pass


class InvalidName(ValidationError):
    pass


class ExpressionError(ValidationError):
    """A ``--filter`` (CESQL) or ``--transform`` (JMESPath) expression that does not parse,
    type-check or fit its bounds; never stored."""


class PayloadTooLarge(ValidationError):
    def __init__(self, size: int, max_payload: int) -> None:
        self.size = size
        self.max_payload = max_payload
        super().__init__(
            f"payload of {size} bytes exceeds the broker's max_payload of {max_payload} bytes"
        )


class NotFound(MeshError, LookupError):
    pass


class Conflict(MeshError):
    pass


class BrokerError(MeshError):
    pass


class BrokerUnavailable(BrokerError):
    pass


class PortInUse(BrokerError):
    pass


class DecodeError(MeshError):
    pass


class StorageError(MeshError):
    pass


class RequestError(MeshError):
    pass


class RequestTimeout(RequestError, TimeoutError):
    pass

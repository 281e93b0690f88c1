"""``mesh target add``'s destination flags: one URL flag per kind, and the options that
belong to it (an option given for another kind is an error, not silently ignored)."""

from __future__ import annotations

from typing import Any

from mesh.destinations import DestinationOptions, missing_extra
from mesh.errors import ValidationError

# option -> the kinds it applies to
OPTION_KINDS: dict[str, tuple[str, ...]] = {
    "exchange": ("amqp",),
    "routing_key": ("amqp",),
    "topic": ("mqtt", "kafka"),
    "qos": ("mqtt",),
    "stream": ("redis",),
    "maxlen": ("redis",),
    "group_id": ("sqs",),
    "key": ("s3", "kafka"),
    "endpoint_url": ("sqs", "s3"),
    "region": ("sqs", "s3"),
}


def pick_destination(
    urls: dict[str, str | None], options: dict[str, Any]
) -> tuple[str, str, DestinationOptions] | None:
    """(kind, url, options) from the flags given, or None when no destination flag is."""
    given = {kind: url for kind, url in urls.items() if url}
    opts = {name: value for name, value in options.items() if value is not None}
    if len(given) > 1:
        raise ValidationError(
            "give one destination: " + " and ".join(f"--{k}" for k in given) + " exclude each other"
        )
    if not given:
        if opts:
            name = next(iter(opts))
            raise ValidationError(f"--{name.replace('_', '-')} needs a destination flag")
        return None
    kind, url = next(iter(given.items()))
    for name in opts:
        if kind not in OPTION_KINDS[name]:
            flags = " or ".join(f"--{k}" for k in OPTION_KINDS[name])
            raise ValidationError(f"--{name.replace('_', '-')} is for {flags} targets")
    missing = missing_extra(kind)
    if missing is not None:
        raise ValidationError(missing)
    return kind, url, DestinationOptions(**opts)

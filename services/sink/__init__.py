"""The sink: mirrors events, delivery records, dead letters and the registry into the
database (``service.py`` is the process; ``rows.py`` turns messages into rows;
``retention.py`` prunes on a period; ``mirror.py`` follows the registry)."""

from services.sink.service import Sink

__all__ = ["Sink"]

"""The health service: the HTTP status page and JSON, the per-target view and the
dashboard (``service.py`` is the process; ``http.py`` its routes; ``dashboard.py`` the
page)."""

from services.health.service import Health

__all__ = ["Health"]

"""The streaming bridge: authenticated WebSocket feeds and tails with resume and no
loss (``service.py`` is the process; ``session.py`` one connection; ``tail.py`` the
ordered reads shared by live tails)."""

from services.bridge.service import Bridge
from services.bridge.session import BridgeOptions

__all__ = ["Bridge", "BridgeOptions"]

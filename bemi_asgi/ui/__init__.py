"""The change browser: a read-only, server-rendered UI over the stored history (see `bemi_asgi.ui.app`)."""

from .app import Authorize, BemiUI, ScopeCallback, allow_all, bemi_ui

__all__ = ["Authorize", "BemiUI", "ScopeCallback", "allow_all", "bemi_ui"]

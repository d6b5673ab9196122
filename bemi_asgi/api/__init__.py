"""The stored history as a JSON API for FastAPI apps (see `bemi_asgi.api.router`)."""

from ..history.access import Authorize, ScopeCallback, allow_all
from .models import BlameView, ChangePageView, ChangeView, CountView, ErrorView, RowStateView
from .router import history_router

__all__ = [
    "Authorize",
    "BlameView",
    "ChangePageView",
    "ChangeView",
    "CountView",
    "ErrorView",
    "RowStateView",
    "ScopeCallback",
    "allow_all",
    "history_router",
]

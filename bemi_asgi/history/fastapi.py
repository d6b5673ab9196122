"""FastAPI (and Starlette) helpers: reach the app's `Bemi` from an endpoint.

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async with bemi_asgi.Bemi(dsn) as bemi:
            app.state.bemi = bemi
            yield

    @app.get("/items/{item_id}/history")
    async def item_history(item_id: int, bemi: Annotated[Bemi, Depends(get_bemi)]) -> list[Change]:
        return await bemi.history("items", item_id)

Only Starlette is imported here: FastAPI recognises the `Request` parameter, so importing bemi_asgi does not
import FastAPI.
"""

from __future__ import annotations

from starlette.requests import HTTPConnection

from .client import Bemi

__all__ = ["get_bemi"]

STATE_ATTRIBUTE = "bemi"


def get_bemi(request: HTTPConnection) -> Bemi:
    """Return the `Bemi` the app keeps in `app.state.bemi` (set it in the lifespan); a dependency for `Depends`."""
    bemi = getattr(request.app.state, STATE_ATTRIBUTE, None)
    if not isinstance(bemi, Bemi):
        raise RuntimeError(
            "no Bemi on app.state.bemi: create one in the app's lifespan, e.g. `app.state.bemi = Bemi(pool)`"
        )
    return bemi

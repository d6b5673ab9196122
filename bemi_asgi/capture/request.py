"""The Starlette `Request` that `BemiMiddleware` hands to the context callback, made cheap for what callbacks read.

A callback typically reads a header and `request.url.path`. Starlette builds `request.url` by assembling the whole
URL (scheme, validated Host header, path, query) and splitting it again: more work than the rest of the middleware
together. Here `request.url` is a `URL` whose `path` comes straight from the scope when the full URL would give the
same text, and whose full form is built only when something else is read (`str(url)`, `url.query`, ...). It is a
real `starlette.datastructures.URL` and the request a real `Request`: every other attribute behaves as Starlette's.
"""

from __future__ import annotations

import re
from typing import Any

from starlette.datastructures import URL
from starlette.requests import Request
from starlette.types import Scope

__all__ = ["CallbackRequest", "ScopeURL"]

# Paths whose text Starlette's URL leaves as is: one leading slash (`//x` loses its authority meaning only with a
# Host), and nothing that URL escapes (`?`, `#`, `\`) or that URL splitting drops (tab, CR, LF).
_PLAIN_PATH = re.compile(r"/(?!/)[^?#\\\t\r\n]*")


class ScopeURL(URL):
    """A request's URL, built from its scope only when more than the path is read."""

    def __init__(self, url: str = "", scope: Scope | None = None, **components: Any) -> None:
        if scope is None or url or components:  # built by URL's own methods (`replace`, ...): an ordinary URL
            super().__init__(url, scope, **components)
        else:
            self._scope = scope

    def __getattr__(self, name: str) -> Any:
        # Reached only for attributes not set yet: URL keeps its text in `_url`, which is built here on first use.
        if name == "_url" and "_scope" in self.__dict__:
            self._url: str = str(URL(scope=self._scope))
            return self._url
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def path(self) -> str:
        scope = self.__dict__.get("_scope")
        if scope is not None:
            path: str = scope["path"]
            if _PLAIN_PATH.fullmatch(path):
                return path
        return super().path


class CallbackRequest(Request):
    """A Starlette `Request` whose `url` is a `ScopeURL`."""

    @property
    def url(self) -> URL:
        url: URL | None = self.__dict__.get("_url")
        if url is None:
            url = self._url = ScopeURL(scope=self.scope)
        return url

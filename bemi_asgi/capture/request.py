"""The Starlette `Request` that `BemiMiddleware` hands to the context callback, made cheap for what callbacks read.

A callback typically reads a header and `request.url.path`, once per request, so every microsecond here is one
every request pays. Starlette builds `request.url` by assembling the whole URL (scheme, validated Host header,
path, query) and splitting it again: more work than the rest of the middleware together. Here `request.url` is a
`URL` whose `path` comes straight from the scope when the full URL would give the same text, and whose full form is
built only when something else is read (`str(url)`, `url.query`, ...). `request.headers.get(name)` looks the name
up in the scope's list directly (Starlette's goes through `Mapping.get`, `__getitem__` and, for a missing header, a
raised and caught KeyError). The request itself is built with the scope alone: what Starlette's constructor sets
per instance (no receive or send channel, no body read yet) are class defaults here. It is a real `Request`, its
`url` a real `starlette.datastructures.URL` and its `headers` real `Headers`: every other attribute behaves as
Starlette's.
"""

from __future__ import annotations

import re
from typing import Any, cast

from starlette.datastructures import URL, FormData, Headers
from starlette.requests import Request, empty_receive, empty_send
from starlette.types import Scope

__all__ = ["CallbackRequest", "ScopeHeaders", "ScopeURL"]

# Paths whose text Starlette's URL leaves as is: one leading slash (`//x` loses its authority meaning only with a
# Host), and nothing that URL escapes (`?`, `#`, `\`) or that URL splitting drops (tab, CR, LF).
_PLAIN_PATH = re.compile(r"/(?!/)[^?#\\\t\r\n]*")


class ScopeURL(URL):
    """A request's URL, built from its scope only when more than the path is read."""

    _scope: Scope | None = None  # set when built from a scope (a class default: reading it needs no dict look-up)

    def __init__(self, url: str = "", scope: Scope | None = None, **components: Any) -> None:
        if scope is None or url or components:  # built by URL's own methods (`replace`, ...): an ordinary URL
            super().__init__(url, scope, **components)
        else:
            self._scope = scope

    @classmethod
    def of(cls, scope: Scope) -> ScopeURL:
        """The URL of `scope` (what `ScopeURL(scope=scope)` gives, without the general constructor's checks)."""
        url = cls.__new__(cls)
        url._scope = scope
        return url

    def __getattr__(self, name: str) -> Any:
        # Reached only for attributes not set yet: URL keeps its text in `_url`, which is built here on first use.
        if name == "_url" and self._scope is not None:
            self._url: str = str(URL(scope=self._scope))
            return self._url
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def path(self) -> str:
        scope = self._scope
        if scope is not None:
            path: str = scope["path"]
            if _PLAIN_PATH.fullmatch(path):
                return path
        return super().path


class ScopeHeaders(Headers):
    """A request's headers, whose `get` reads the scope's list without going through `Mapping.get`."""

    @classmethod
    def of(cls, scope: Scope) -> ScopeHeaders:
        """The headers of `scope` (what `Headers(scope=scope)` gives, which also makes the scope's a list)."""
        headers = cls.__new__(cls)
        raw = scope["headers"]
        if type(raw) is not list:  # an ASGI server may pass any iterable
            raw = scope["headers"] = list(raw)
        headers._list = raw
        return headers

    def get(self, key: str, default: Any = None) -> Any:
        name = key.lower().encode("latin-1")
        for header, value in self._list:
            if header == name:
                return value.decode("latin-1")
        return default


class CallbackRequest(Request):
    """A Starlette `Request` whose `url` is a `ScopeURL` and whose `headers` are `ScopeHeaders`."""

    # Starlette's `Request.__init__` sets these on each instance; the callback's request never receives or sends,
    # so they are shared defaults, and the few methods that change them set them on the instance as usual.
    _receive = staticmethod(empty_receive)
    _send = staticmethod(empty_send)
    _stream_consumed = False
    _is_disconnected = False
    _form: FormData | None = None
    # Built on first use. Starlette types them as always set (its properties test them with hasattr).
    _headers: Headers = cast(Headers, None)
    _url: URL = cast(URL, None)

    def __init__(self, scope: Scope) -> None:  # the middleware hands over an http scope, and nothing else
        self.scope = scope

    @property
    def headers(self) -> Headers:
        headers = self._headers
        if headers is None:
            headers = self._headers = ScopeHeaders.of(self.scope)
        return headers

    @property
    def url(self) -> URL:
        url = self._url
        if url is None:
            url = self._url = ScopeURL.of(self.scope)
        return url

"""The callback's Request: `request.url` reads the path from the scope and otherwise is Starlette's own URL."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from starlette.datastructures import URL
from starlette.requests import Request

from bemi_asgi.capture.request import CallbackRequest, ScopeURL

# Paths as servers pass them (percent-decoded text), with the characters URL escapes or drops mixed in.
_paths = st.one_of(
    st.text(alphabet=st.sampled_from("/ab%?#\\\t\r\n é:@.;="), max_size=12),
    st.text(max_size=12).map(lambda text: "/" + text),
)
_hosts = st.sampled_from([None, "example.com", "example.com:8080", "[::1]:81", "bad host", "a/b", "h:99999"])
_servers = st.sampled_from([None, ("srv", 80), ("srv", 8443), ("::1", 443)])


def _scope(path: str, host: str | None, server: tuple[str, int] | None, scheme: str, query: bytes) -> dict[str, Any]:
    headers = [] if host is None else [(b"host", host.encode("latin-1"))]
    scope: dict[str, Any] = {"type": "http", "path": path, "scheme": scheme, "query_string": query, "headers": headers}
    if server is not None:
        scope["server"] = server
    return scope


@settings(max_examples=400, deadline=None)
@given(
    path=_paths,
    host=_hosts,
    server=_servers,
    scheme=st.sampled_from(["http", "https", "ws"]),
    query=st.sampled_from([b"", b"a=1&b=%20", b"x"]),
)
@example(path="//evil/x", host="example.com", server=None, scheme="http", query=b"")
@example(path="//evil/x", host=None, server=None, scheme="http", query=b"")
@example(path="/a?b#c\\d", host=None, server=("srv", 80), scheme="http", query=b"q=1")
@example(path="", host="example.com", server=None, scheme="http", query=b"")
def test_url_matches_starlette(path: str, host: str | None, server: Any, scheme: str, query: bytes) -> None:
    """For any scope, the callback's `request.url` has the path, text and parts Starlette's own URL has."""
    scope = _scope(path, host, server, scheme, query)
    expected = URL(scope=scope)
    url = CallbackRequest(scope).url
    assert isinstance(url, ScopeURL)
    assert url.path == expected.path
    assert str(url) == str(expected)
    assert (url.scheme, url.netloc, url.query, url.port, url.is_secure) == (
        expected.scheme,
        expected.netloc,
        expected.query,
        expected.port,
        expected.is_secure,
    )
    assert url == expected
    assert url.replace(query="z=1") == expected.replace(query="z=1")
    assert url.include_query_params(k="v") == expected.include_query_params(k="v")


def test_path_alone_builds_no_url() -> None:
    """Reading only the path of a plain request builds no URL text (its cost is what this class avoids)."""
    url = CallbackRequest(_scope("/orders/7", "example.com", None, "http", b"a=1")).url
    assert url.path == "/orders/7"
    assert "_url" not in url.__dict__
    assert str(url) == "http://example.com/orders/7?a=1"
    assert "_url" in url.__dict__


def test_the_rest_of_the_request_is_starlettes() -> None:
    """Headers, method, query parameters and client are Starlette's, and the URL object is built once."""
    scope = _scope("/p", "h", None, "http", b"x=1")
    scope.update(method="PATCH", client=("10.0.0.1", 5000))
    scope["headers"].append((b"x-user-id", b"42"))
    request, plain = CallbackRequest(scope), Request(scope)
    assert isinstance(request, Request)
    assert request.url is request.url
    assert (request.method, request.headers, request.query_params, request.client) == (
        plain.method,
        plain.headers,
        plain.query_params,
        plain.client,
    )


@settings(max_examples=200, deadline=None)
@given(
    headers=st.lists(
        st.tuples(st.sampled_from([b"x-user-id", b"X-User-Id", b"host", b"x-tenant"]), st.binary(max_size=6)),
        max_size=4,
    ),
    name=st.sampled_from(["x-user-id", "X-USER-ID", "x-tenant", "missing"]),
)
def test_header_lookup_matches_starlette(headers: list[tuple[bytes, bytes]], name: str) -> None:
    """`request.headers.get(name)` and `[name]` give what Starlette's Headers give, for any headers, present or not."""
    scope = _scope("/p", None, None, "http", b"")
    scope["headers"] = headers
    expected = Request(dict(scope)).headers
    got = CallbackRequest(scope).headers
    assert got.get(name) == expected.get(name)
    assert got.get(name, "default") == expected.get(name, "default")
    assert (name in got) == (name in expected)
    assert got.items() == expected.items()


def test_headers_of_a_tuple_become_a_list_as_in_starlette() -> None:
    """A server may pass headers as a tuple: they are read all the same, and the scope keeps a list, as Starlette's
    Headers leave it."""
    scope = _scope("/p", None, None, "http", b"")
    scope["headers"] = ((b"x-user-id", b"7"),)
    assert CallbackRequest(scope).headers.get("x-user-id") == "7"
    assert scope["headers"] == [(b"x-user-id", b"7")]


async def test_the_body_is_not_the_callbacks() -> None:
    """The callback's request has no receive channel: reading the body fails as Starlette's does without one, and
    what one request's methods change stays on that request."""
    scope = _scope("/p", None, None, "http", b"")
    request = CallbackRequest(scope)
    with pytest.raises(RuntimeError, match="Receive channel has not been made available"):
        await request.body()
    request._stream_consumed = True
    assert CallbackRequest(scope)._stream_consumed is False
    assert CallbackRequest(scope)._is_disconnected is False

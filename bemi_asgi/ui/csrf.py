"""Cross-site request forgery protection for the change browser's one writing form (revert).

Three independent checks, each enough to stop a page on another site from applying a revert in a signed-in
visitor's name:
- the POST must come from this origin: its `Origin` header (or, when a browser sends none, its `Referer`) names
  the browser's own scheme and host, and `Sec-Fetch-Site`, when sent, says same-origin;
- a session cookie set with `SameSite=Strict` and `HttpOnly` (so a cross-site POST does not carry it, and no
  script reads it), to which
- the form's token is bound: `HMAC(key, session + what the form applies)`, so a token is valid only for the browser
  it was given to and for the revert it was shown with.

Behind a proxy that terminates TLS, run the server so that it sees the scheme and host the browser used (uvicorn
`--proxy-headers`, `--forwarded-allow-ips`), or the origin check refuses every POST.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Mapping

from starlette.requests import Request

from ..history.refs import MIN_SECRET_BYTES

__all__ = ["COOKIE", "CsrfGuard"]

COOKIE = "bemi_csrf"
_SAME_ORIGIN = ("same-origin", "none")  # "none": typed or bookmarked, which a form post never is, but harmless


class CsrfGuard:
    """Makes and checks the revert form's tokens under one key (derived from the browser's `secret`)."""

    def __init__(self, key: bytes) -> None:
        if len(key) < MIN_SECRET_BYTES:
            raise ValueError(f"secret= must be at least {MIN_SECRET_BYTES} bytes, got {len(key)}")
        self._key = hmac.digest(key, b"bemi-asgi ui csrf", hashlib.sha256)

    def __repr__(self) -> str:
        return "CsrfGuard(key=<hidden>)"

    @staticmethod
    def session(request: Request) -> tuple[str, bool]:
        """The visitor's session value, and whether it is new (then `set_cookie` must send it)."""
        current = request.cookies.get(COOKIE, "")
        if len(current) == 43 and current.replace("-", "").replace("_", "").isalnum():
            return current, False
        return secrets.token_urlsafe(32), True

    def token(self, session: str, action: str) -> str:
        """The form token for `action` (what the form applies) in this session."""
        digest = hmac.digest(self._key, f"{session}\0{action}".encode(), hashlib.sha256)
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    @staticmethod
    def cookie(request: Request, session: str, path: str) -> str:
        """The Set-Cookie header value for a new session."""
        secure = "; Secure" if request.url.scheme == "https" else ""
        return f"{COOKIE}={session}; Path={path or '/'}; HttpOnly; SameSite=Strict{secure}"

    def refusal(self, request: Request, form: Mapping[str, str], action: str) -> str | None:
        """Why this POST must be refused (None: it came from the form this browser was given, on this site)."""
        origin = f"{request.url.scheme}://{request.url.netloc}"
        sent_origin = request.headers.get("origin")
        if sent_origin is not None:
            if sent_origin != origin:
                return f"the request came from another site ({sent_origin})"
        else:
            referer = request.headers.get("referer", "")
            if not referer.startswith(origin + "/"):
                return "the request does not say which site it came from (no Origin or Referer header)"
        fetch_site = request.headers.get("sec-fetch-site")
        if fetch_site is not None and fetch_site not in _SAME_ORIGIN:
            return f"the browser says the request is {fetch_site}"
        session = request.cookies.get(COOKIE)
        if not session:
            return "the session cookie is missing (cookies blocked, or the form came from elsewhere)"
        if not hmac.compare_digest(form.get("token", ""), self.token(session, action)):
            return "the form's token does not match this session and revert: open the revert page again"
        return None

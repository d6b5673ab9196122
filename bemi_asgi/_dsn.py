"""Connection URLs: read before any driver sees them, and kept out of every message.

Drivers quote the pieces of a URL they cannot read in their errors (`invalid percent-encoded token: "pa%zz..."`),
and a password holding an unencoded `@`, `/` or `?` spills into the host, the database name or the query, which
later errors print (`failed to resolve host 'rd@db.internal'`). So every command checks its URLs with `check_dsn`
first, whose errors never quote the URL, and passes every message it prints through `redact`.
"""

from __future__ import annotations

import re
from urllib.parse import quote

from ._exceptions import ConfigError

__all__ = ["check_dsn", "redact"]

_ENCODE_HINT = (
    "characters such as @ % : / ? # and spaces in the user name or password must be percent-encoded in a URL "
    "(@ as %40, % as %25, / as %2F), or give the password in the PGPASSWORD environment variable"
)
#: What libpq quotes in its messages about a connection string: pieces of that string.
_QUOTED = re.compile(r"\"[^\"]*\"?|'[^']*'?")
#: Where the rest of a URL's password with an unencoded @ lands (libpq ends the user information at the first @).
_SPILL_FIELDS = ("host", "hostaddr", "port", "dbname")


def check_dsn(dsn: str, *, what: str = "the database URL") -> None:
    """Raise ConfigError (naming no part of `dsn`) if it cannot be read as libpq reads it, or looks like a password
    with an unencoded @ broke it apart."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = conninfo_to_dict(dsn)
    except Exception as exc:  # psycopg.ProgrammingError; its message quotes the URL
        reason = _QUOTED.sub('"..."', " ".join(str(exc).split()))
        raise ConfigError(f"{what} cannot be read ({reason}): {_ENCODE_HINT}") from None
    if not dsn.lstrip().startswith(("postgresql://", "postgres://")):
        return
    for name in _SPILL_FIELDS:
        if "@" in str(params.get(name) or ""):
            raise ConfigError(
                f"{what} has an @ in its {name}, which is how a password with an unencoded @ reads: {_ENCODE_HINT}"
            )


def redact(text: str, *dsns: str | None) -> str:
    """`text` without the passwords of `dsns` (as written, percent-encoded or decoded) or the URLs themselves."""
    from psycopg.conninfo import conninfo_to_dict

    for dsn in dsns:
        if not dsn:
            continue
        secrets = {dsn}
        try:
            password = conninfo_to_dict(dsn).get("password")
        except Exception:  # unreadable: check_dsn refuses it; hide what can be hidden
            password = None
        if password:
            secrets |= {str(password), quote(str(password), safe="")}
        for secret in sorted(secrets, key=len, reverse=True):
            text = text.replace(secret, "***")
    return text

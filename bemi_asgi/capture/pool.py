"""The asyncpg pool whose connections carry the Bemi context into the WAL.

Each written transaction gets one transactional logical message with the prefix `_bemi` and the context's JSON,
sent with COMMIT in the same round trip and only if the transaction wrote (it has an xid):

    SELECT CASE WHEN pg_current_xact_id_if_assigned() IS NOT NULL
                THEN pg_logical_emit_message(true, '_bemi', <json>) END;COMMIT

How each way of writing is covered, by `BemiConnection`:

- A transaction (`conn.transaction()`, `tr.start()/commit()`, raw `execute("BEGIN")` ... `execute("COMMIT")`): the
  COMMIT statement (asyncpg's Transaction sends it through `execute`) gets the message in front of it. A
  savepoint's RELEASE does not emit: only the outermost COMMIT does. ROLLBACK sends nothing.
- The context changing inside a transaction: just before the first statement under the new context, the previous
  context's message is sent (in the same simple query for `execute` without arguments, one extra round trip
  otherwise), so with the stitching rule (a change takes the context of the first `_bemi` message after it) each
  part of the transaction keeps the context it ran under. A part that ran with no context gets `{}`.
- A transaction whose statements are all recognized reads (see `classify`) sends nothing at COMMIT.
- Outside a transaction, a statement that may write (see `classify`) is wrapped when a context is set:
  `execute` without arguments sends the message and the statement as one simple query (one implicit transaction);
  the message comes first there, which the stitching rule reads the same way, because an appended statement would
  replace the status `execute` returns. Statements with arguments, `executemany`, `copy_*` and prepared statements
  run as BEGIN / statement / message + COMMIT. Reads run as they are.

Note: a statement counts as a read only when its text shows it: a query (SELECT, WITH, VALUES, TABLE, SHOW) with
no data-modifying keyword that calls only built-in functions. A call to one of your functions counts as a write
(outside a transaction it then runs as BEGIN / statement / COMMIT: two more round trips, no message unless it
wrote). A write the text cannot show, such as a view whose column calls a writing function, is not recognized.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg
from asyncpg.prepared_stmt import PreparedStatement

from .context import MESSAGE_PREFIX, ContextData, activate, current, deactivate

__all__ = ["BemiConnection", "BemiPreparedStatement", "classify", "connect", "create_pool", "emit_sql"]

T = TypeVar("T")

if TYPE_CHECKING:
    _Connection = asyncpg.Connection[asyncpg.Record]
    _Statement = PreparedStatement[asyncpg.Record]
else:  # asyncpg's classes are generic only in the stubs
    _Connection = asyncpg.Connection
    _Statement = PreparedStatement


# --- SQL text -------------------------------------------------------------------------------------------------------


def quote_literal(text: str) -> str:
    """Quote `text` as a PostgreSQL dollar-quoted string literal.

    Dollar quoting takes the body verbatim: no escape processing at all, so the result does not depend on
    standard_conforming_strings or backslash_quote, and any text round-trips exactly as long as the closing tag does
    not occur in it, which the tag is chosen to guarantee. The check looks for the tag without its closing `$`: text
    ending in `$bemi` would otherwise join the closing tag's first `$` and end the literal early. (E'' quoting would
    also work but needs every backslash and quote escaped; here nothing in the text is ever rewritten.) NUL cannot
    occur: the context refuses it.
    """
    tag = "bemi"
    n = 0
    while f"${tag}" in text:
        n += 1
        tag = f"bemi{n}"
    return f"${tag}${text}${tag}$"


@functools.lru_cache(maxsize=256)
def _emit_sql_for(json: str) -> tuple[str, str]:
    literal = quote_literal(json)
    call = f"pg_logical_emit_message(true, '{MESSAGE_PREFIX}', {literal})"  # 3 arguments: PG 17 added a 4th
    return f"SELECT CASE WHEN pg_current_xact_id_if_assigned() IS NOT NULL THEN {call} END;", f"SELECT {call};"


def emit_sql(data: ContextData | None, *, conditional: bool = True) -> str:
    """The statement (with its `;`) that emits `data` as a `_bemi` message; None means the empty context `{}`.

    Conditional: only if the transaction already has an xid (it wrote). Cached per context JSON text (its hash is
    computed once per str object), so the hot path does no formatting.
    """
    pair = _emit_sql_for("{}" if data is None else data.json)
    return pair[0] if conditional else pair[1]


# --- statement classification ---------------------------------------------------------------------------------------

READ, WRITE, OTHER = 0, 1, 2

_WRITE_WORDS = re.compile(r"\b(?:insert|update|delete|merge|copy|truncate|call|do|execute)\b", re.IGNORECASE)
# Commands that refuse to run inside a transaction block (or a multi-statement query): never wrap them.
_NON_TRANSACTIONAL = re.compile(
    r"\b(?:vacuum|concurrently|tablespace|subscription|prepared|checkpoint|reindex)\b"
    r"|\b(?:create|drop|alter)\s+database\b|\balter\s+system\b|\bdiscard\s+all\b|(?:^|;)\s*cluster\s*(?:;|$)",
    re.IGNORECASE,
)
_QUERY_START = re.compile(r"^(?:\s+|--[^\n]*(?:\n|$)|/\*.*?\*/|\()*(?:select|with|values|table|explain)\b", re.I | re.S)
_SHOW = re.compile(r"^\s*show\b", re.IGNORECASE)
_CALL = re.compile(r"([a-z_][\w$]*)\s*\(", re.IGNORECASE)
_QUOTED_CALL = re.compile(r"\"\s*\(")
# Names followed by "(" in a query that cannot write: SQL keywords, type modifiers and built-in functions without
# side effects. A call to anything else (your functions, which may write) makes the statement count as a write.
_PURE = frozenset(
    re.findall(
        r"\S+",
        """
    all and any array as between by case cast check exists filter from group having in interval is join lateral
    limit not offset on or order over partition row rows select some then using values when where window with within
    bit char character decimal numeric time timestamp timestamptz varchar float
    abs age array_agg array_length array_position array_remove array_to_string avg bool_and bool_or btrim cardinality
    ceil ceiling char_length clock_timestamp coalesce concat concat_ws count current_setting date_part date_trunc
    dense_rank encode decode every extract first_value floor format generate_series greatest initcap json_agg
    json_build_array json_build_object json_object_agg jsonb_agg jsonb_array_elements jsonb_array_elements_text
    jsonb_array_length jsonb_build_array jsonb_build_object jsonb_each jsonb_each_text jsonb_extract_path
    jsonb_extract_path_text jsonb_object_agg jsonb_object_keys jsonb_path_exists jsonb_path_query jsonb_set
    jsonb_strip_nulls jsonb_typeof lag last_value lead least left length lower lpad ltrim make_interval max md5 min mod
    now ntile nullif percent_rank percentile_cont percentile_disc position power random rank regexp_match
    regexp_matches regexp_replace regexp_split_to_array replace right round row_number row_to_json rpad rtrim sign
    split_part sqrt starts_with statement_timestamp string_agg string_to_array strpos substr substring sum to_char
    to_date to_json to_jsonb to_number to_timestamp translate trim trunc unnest upper version
    """,
    )
)


@functools.lru_cache(maxsize=2048)
def classify(query: str) -> int:
    """Judge a statement from its text (cached per text): READ, WRITE (may write rows) or OTHER (DDL, settings...).

    READ only when that is certain from the text: a query with no data-modifying keyword that calls only built-in
    functions. Anything doubtful is a WRITE, which pays a (conditional) message, never loses one; commands that
    cannot run in a transaction block are OTHER and left alone.
    """
    if _NON_TRANSACTIONAL.search(query):
        return OTHER
    if _WRITE_WORDS.search(query):
        return WRITE
    if _QUERY_START.match(query):
        if _QUOTED_CALL.search(query) or any(name.lower() not in _PURE for name in _CALL.findall(query)):
            return WRITE
        return READ
    return READ if _SHOW.match(query) else OTHER


_NAME = r"(\"(?:[^\"]|\"\")+\"|[a-z_][\w$]*)"
_END = r"\s*;?\s*$"
_WORK = r"(?:\s+(?:work|transaction))?"
_CHAIN = r"(?:\s+and\s+(?:no\s+)?chain)?"
_CONTROL = [
    ("commit", re.compile(r"^\s*(?:commit|end)" + _WORK + _CHAIN + _END, re.I)),
    ("rollback_to", re.compile(r"^\s*rollback" + _WORK + r"\s+to\s+(?:savepoint\s+)?" + _NAME + _END, re.I)),
    ("rollback", re.compile(r"^\s*(?:rollback|abort)" + _WORK + _CHAIN + _END, re.I)),
    ("release", re.compile(r"^\s*release\s+(?:savepoint\s+)?" + _NAME + _END, re.I)),
    ("savepoint", re.compile(r"^\s*savepoint\s+" + _NAME + _END, re.I)),
    ("begin", re.compile(r"^\s*(?:begin|start\s+transaction)\b", re.I)),
]


@functools.lru_cache(maxsize=512)
def control(query: str) -> tuple[str, str] | None:
    """Classify a transaction-control statement: (kind, savepoint name or ''), or None for any other text."""
    for kind, pattern in _CONTROL:
        match = pattern.match(query)
        if match:
            name = match.group(1) if match.groups() else ""
            name = name[1:-1].replace('""', '"') if name.startswith('"') else name.lower()
            return kind, name
    return None


# --- the connection -------------------------------------------------------------------------------------------------

_SavedState = tuple[str, bool, ContextData | None, bool]


class BemiConnection(_Connection):
    """An `asyncpg.Connection` whose written transactions carry the current Bemi context into the WAL.

    Use it through `create_pool` / `connect`, or pass `connection_class=BemiConnection` to asyncpg yourself.

    Note: a cursor's fetches are not seen one by one: a transaction written only through cursors carries the
    context of the last statement seen before them, or else the one current at COMMIT.
    """

    # Per-transaction state: whether a statement ran yet, whether one may have written, the context the last one ran
    # under, whether any ran under a context, and the savepoints (name + that state when they were set) so ROLLBACK
    # TO can restore it.
    _bemi_open: bool
    _bemi_started: bool
    _bemi_wrote: bool
    _bemi_ran_under: ContextData | None
    _bemi_touched: bool
    _bemi_savepoints: list[_SavedState]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._bemi_open = False
        self._bemi_started = False
        self._bemi_wrote = False
        self._bemi_ran_under = None
        self._bemi_touched = False
        self._bemi_savepoints = []

    # -- transaction state --

    def _bemi_begin(self) -> None:
        self._bemi_open = True
        self._bemi_savepoints = []
        self._bemi_started = False
        self._bemi_wrote = False

    def _bemi_note(self, kind: int) -> None:
        """Record a statement the connection cannot hold up (a cursor): only whether it may write."""
        if not self._bemi_open:
            self._bemi_begin()
        if kind != READ:
            self._bemi_wrote = True

    def _bemi_before_statement(self, kind: int) -> str | None:
        """Record that a statement of `kind` runs now, in a transaction; return the SQL to send first, if any.

        That SQL is the previous context's message, owed when the context changed since the last statement and
        something before may have written.
        """
        data = current()
        if not self._bemi_open:
            self._bemi_begin()
        wrote = self._bemi_wrote
        if kind != READ:
            self._bemi_wrote = True
        if not self._bemi_started:
            self._bemi_started = True
            self._bemi_ran_under = data
            self._bemi_touched = data is not None
            return None
        previous = self._bemi_ran_under
        if data is previous or (data is not None and previous is not None and data.json == previous.json):
            return None
        self._bemi_ran_under = data
        if data is not None:
            self._bemi_touched = True
        return emit_sql(previous) if wrote else None

    def _bemi_commit_message(self) -> str | None:
        """The message SQL owed at COMMIT, or None when the transaction ran without any context."""
        if not (self._bemi_open and self._bemi_started):
            data = current()  # no statement seen (cursors, for instance): the context at COMMIT
            return None if data is None else emit_sql(data)
        if not self._bemi_wrote:  # only recognized reads: nothing to attribute, send nothing
            return None
        if self._bemi_ran_under is not None:
            return emit_sql(self._bemi_ran_under)
        return emit_sql(None) if self._bemi_touched else None

    def _bemi_end(self) -> None:
        self._bemi_open = False
        self._bemi_savepoints = []

    # -- simple query protocol --

    async def execute(self, query: str, *args: object, timeout: float | None = None) -> str:  # noqa: ASYNC109
        if args:
            return await self._bemi_call(query, super().execute, query, *args, timeout=timeout)
        parent = super().execute
        if not self.is_in_transaction():
            self._bemi_end()
            data = current()
            if data is None or classify(query) != WRITE:
                return await parent(query, timeout=timeout)
            if _WRITE_WORDS.search(query) is None:  # only calls to functions that may write: wrap, emit if they did
                return await self._bemi_wrap(data, parent, query, timeout=timeout)
            # One implicit transaction: message first (see the module docstring), then the statements.
            return await parent(emit_sql(data, conditional=False) + query, timeout=timeout)
        kind = control(query)
        if kind is None:
            owed = self._bemi_before_statement(classify(query))
            return await parent(query if owed is None else owed + query, timeout=timeout)
        return await self._bemi_control(kind, query, timeout)

    async def _bemi_control(self, kind: tuple[str, str], query: str, timeout: float | None) -> str:  # noqa: ASYNC109
        parent = super().execute
        what, name = kind
        if what == "commit":
            message = self._bemi_commit_message()
            self._bemi_end()
            if message is None:
                return await parent(query, timeout=timeout)
            try:
                return await parent(message + query, timeout=timeout)
            except asyncpg.InFailedSQLTransactionError:
                # COMMIT of a failed transaction rolls back without an error: keep that behaviour.
                return await parent(query, timeout=timeout)
        if what == "rollback":
            self._bemi_end()
            return await parent(query, timeout=timeout)
        if what == "savepoint":
            owed = self._bemi_before_statement(READ)  # a message owed is sent before the savepoint, so it survives it
            status = await parent(query if owed is None else owed + query, timeout=timeout)
            self._bemi_savepoints.append((name, self._bemi_started, self._bemi_ran_under, self._bemi_touched))
            return status
        status = await parent(query, timeout=timeout)
        for index in range(len(self._bemi_savepoints) - 1, -1, -1):
            if self._bemi_savepoints[index][0] == name:
                if what == "rollback_to":  # the savepoint stays; what ran after it (messages included) is undone
                    _, self._bemi_started, self._bemi_ran_under, self._bemi_touched = self._bemi_savepoints[index]
                    del self._bemi_savepoints[index + 1 :]
                elif what == "release":
                    del self._bemi_savepoints[index:]
                break
        return status

    # -- extended query protocol, COPY, prepared statements --

    async def _bemi_call(self, query: str | None, fn: Callable[..., Awaitable[T]], /, *args: Any, **kwargs: Any) -> T:
        """Run `fn(*args, **kwargs)`, a statement with text `query` (None: a write, like COPY), with the context."""
        if self.is_in_transaction():
            owed = self._bemi_before_statement(WRITE if query is None else classify(query))
            if owed is not None:
                await _Connection.execute(self, owed)
            return await fn(*args, **kwargs)
        data = current()
        if data is None or (query is not None and classify(query) != WRITE):
            return await fn(*args, **kwargs)
        return await self._bemi_wrap(data, fn, *args, **kwargs)

    async def _bemi_wrap(self, data: ContextData, fn: Callable[..., Awaitable[T]], /, *args: Any, **kwargs: Any) -> T:
        """Run `fn` as its own transaction: BEGIN / statement / message + COMMIT."""
        self._bemi_end()
        execute = super().execute
        await execute("BEGIN")
        try:
            result = await fn(*args, **kwargs)
        except BaseException:
            if self.is_in_transaction() and not self.is_closed():
                with contextlib.suppress(Exception):  # broken or busy: the pool's reset rolls back
                    await execute("ROLLBACK")
            raise
        await execute(emit_sql(data) + "COMMIT")
        return result

    async def executemany(self, command: str, args: Any, *, timeout: float | None = None) -> None:  # noqa: ASYNC109
        await self._bemi_call(command, super().executemany, command, args, timeout=timeout)

    async def fetch(self, query: str, *args: object, timeout: float | None = None, record_class: Any = None) -> Any:  # noqa: ASYNC109
        return await self._bemi_call(query, super().fetch, query, *args, timeout=timeout, record_class=record_class)

    async def fetchval(self, query: str, *args: object, column: int = 0, timeout: float | None = None) -> Any:  # noqa: ASYNC109
        return await self._bemi_call(query, super().fetchval, query, *args, column=column, timeout=timeout)

    async def fetchrow(self, query: str, *args: object, timeout: float | None = None, record_class: Any = None) -> Any:  # noqa: ASYNC109
        return await self._bemi_call(query, super().fetchrow, query, *args, timeout=timeout, record_class=record_class)

    async def fetchmany(self, query: str, args: Any, *, timeout: float | None = None, record_class: Any = None) -> Any:  # noqa: ASYNC109
        return await self._bemi_call(query, super().fetchmany, query, args, timeout=timeout, record_class=record_class)

    async def copy_to_table(self, table_name: str, **kwargs: Any) -> str:
        return await self._bemi_call(None, super().copy_to_table, table_name, **kwargs)

    async def copy_records_to_table(self, table_name: str, **kwargs: Any) -> str:
        return await self._bemi_call(None, super().copy_records_to_table, table_name, **kwargs)

    async def copy_from_query(self, query: str, *args: object, **kwargs: Any) -> str:
        # COPY (INSERT ... RETURNING ...) TO STDOUT writes.
        return await self._bemi_call(query, super().copy_from_query, query, *args, **kwargs)

    def cursor(self, query: str, *args: object, **kwargs: Any) -> Any:
        if self.is_in_transaction():  # cursors only run in a transaction
            self._bemi_note(classify(query))
        return super().cursor(query, *args, **kwargs)

    async def reset(self, *, timeout: float | None = None) -> None:  # noqa: ASYNC109
        # The pool resets a connection on release, maybe inside the caller's context: that is no write of theirs.
        token = activate(None)
        try:
            await super().reset(timeout=timeout)
        finally:
            deactivate(token)

    async def prepare(self, query: str, **kwargs: Any) -> Any:
        statement = await super().prepare(query, **kwargs)
        # Same slots, one wrapper object: replacing it would let the original's __del__ free the shared state.
        statement.__class__ = BemiPreparedStatement
        return statement


class BemiPreparedStatement(_Statement):
    """A prepared statement of a `BemiConnection`: its executions carry the context like the connection's."""

    __slots__ = ()

    def _bemi(self) -> tuple[BemiConnection, str]:
        return self._connection, self._query  # type: ignore[attr-defined]

    def cursor(self, *args: object, **kwargs: Any) -> Any:
        conn, query = self._bemi()
        if conn.is_in_transaction():
            conn._bemi_note(classify(query))
        return super().cursor(*args, **kwargs)

    async def fetch(self, *args: object, timeout: float | None = None) -> Any:  # noqa: ASYNC109
        conn, query = self._bemi()
        return await conn._bemi_call(query, super().fetch, *args, timeout=timeout)

    async def fetchval(self, *args: object, column: int = 0, timeout: float | None = None) -> Any:  # noqa: ASYNC109
        conn, query = self._bemi()
        return await conn._bemi_call(query, super().fetchval, *args, column=column, timeout=timeout)

    async def fetchrow(self, *args: object, timeout: float | None = None) -> Any:  # noqa: ASYNC109
        conn, query = self._bemi()
        return await conn._bemi_call(query, super().fetchrow, *args, timeout=timeout)

    async def fetchmany(self, args: Any, *, timeout: float | None = None) -> Any:  # noqa: ASYNC109
        conn, query = self._bemi()
        return await conn._bemi_call(query, super().fetchmany, args, timeout=timeout)

    async def executemany(self, args: Any, *, timeout: float | None = None) -> None:  # noqa: ASYNC109
        conn, query = self._bemi()
        await conn._bemi_call(query, super().executemany, args, timeout=timeout)


# --- entry points ---------------------------------------------------------------------------------------------------


def create_pool(dsn: str | None = None, **kwargs: Any) -> asyncpg.Pool[asyncpg.Record]:
    """Create an asyncpg pool whose connections carry the Bemi context; same arguments as `asyncpg.create_pool`.

        pool = await bemi_asgi.create_pool(dsn, min_size=2, max_size=10)
        async with bemi_asgi.create_pool(dsn) as pool: ...

    A `connection_class` must be a subclass of `BemiConnection`.
    """
    kwargs["connection_class"] = _connection_class(kwargs.get("connection_class"))
    return asyncpg.create_pool(dsn, **kwargs)


async def connect(dsn: str | None = None, **kwargs: Any) -> BemiConnection:
    """Open one connection that carries the Bemi context; same arguments as `asyncpg.connect`."""
    kwargs["connection_class"] = _connection_class(kwargs.get("connection_class"))
    connection: BemiConnection = await asyncpg.connect(dsn, **kwargs)
    return connection


def _connection_class(cls: Any) -> type[BemiConnection]:
    if cls is None:
        return BemiConnection
    if not (isinstance(cls, type) and issubclass(cls, BemiConnection)):
        raise TypeError(
            f"connection_class must be a subclass of bemi_asgi.BemiConnection, got {cls!r}: "
            "derive your connection class from BemiConnection instead of asyncpg.Connection"
        )
    return cls

"""The asyncpg pool whose connections carry the Bemi context into the WAL.

Each written transaction gets a transactional logical message with the prefix `_bemi` and the context's JSON, sent
with COMMIT in the same round trip and only if the transaction wrote (it has an xid):

    SELECT pg_logical_emit_message(true, '_bemi', <json>) WHERE pg_current_xact_id_if_assigned() IS NOT NULL;COMMIT

(The WHERE form costs the server about 8,000 fewer instructions to parse, plan and run than the CASE form it
replaced; README, Performance.)

Inside a transaction the server judges, never the statement's text (see `Transaction`):

- every COMMIT, END, COMMIT AND CHAIN and PREPARE TRANSACTION, on every path (`execute`, `fetch*`, prepared
  statements, `conn.transaction()`, SQLAlchemy), carries the conditional message of the context the transaction's
  statements ran under;
- when the context changes between two statements, the previous context's conditional message is sent just before
  the first statement under the new one (in the same simple query for `execute` without arguments, one extra round
  trip otherwise). With the stitching rule (a change takes the context of the first `_bemi` message after it) each
  part of the transaction keeps the context it ran under; a part that ran with no context gets `{}`.
- a savepoint remembers that state and ROLLBACK TO restores it, because a rolled-back savepoint takes the messages
  sent after it along;
- a READ ONLY transaction sends nothing: the server refuses its writes.

Transaction control is recognised by PostgreSQL's own parser (`statements.read`), in every spelling, inside
multi-statement strings too; before every call the tracked state is aligned with the server's transaction status
(`is_in_transaction()`), and after a multi-statement string too.

Outside a transaction, the text decides only whether to wrap a statement (see `statements` for what counts as a
possible write): `execute` without arguments sends an unconditional message in front of the first writing statement
of the query (one implicit transaction, one round trip; in front, because an appended statement would replace the
status `execute` returns); a statement that only calls functions which may write, statements with arguments,
`executemany`, `copy_*` and prepared statements run as BEGIN / statement / conditional message + COMMIT. A write the
text does not show runs unwrapped and lacks its context; it never carries another one.

The pool never changes what a statement does: `CALL` and `DO` (they may COMMIT, which works only at top level) and
other utility statements are never wrapped, SET statements are never preceded by a message (SET TRANSACTION must
come first), and a message that cannot be written at COMMIT or around a wrapped statement rolls its transaction
back and raises `SourceNotReadyError` (the cause is in the source: `wal_level`, or EXECUTE on
`pg_logical_emit_message` revoked). A message owed mid-transaction that fails leaves that transaction aborted, as any
failed statement does, for its owner to roll back.

Note: a procedure's or DO block's own COMMITs carry no context, and neither do their writes outside a transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import asyncpg
from asyncpg.cursor import Cursor, CursorFactory, CursorIterator
from asyncpg.prepared_stmt import PreparedStatement

from .._exceptions import SourceNotReadyError
from . import tracing  # noqa: F401  (imported for its effect: writes carry the active trace)
from .context import MESSAGE_PREFIX, ContextData, current
from .session_reset import reset_query
from .statements import CACHED_LENGTH, Statement, Step, Writes, read

__all__ = [
    "BemiConnection",
    "BemiPreparedStatement",
    "Transaction",
    "TransactionState",
    "connect",
    "create_pool",
    "emit_sql",
]

T = TypeVar("T")

if TYPE_CHECKING:
    _Connection = asyncpg.Connection[asyncpg.Record]
    _Statement = PreparedStatement[asyncpg.Record]
else:  # asyncpg's classes are generic only in the stubs
    _Connection = asyncpg.Connection
    _Statement = PreparedStatement


# --- the message ----------------------------------------------------------------------------------------------------


def dollar_quote(text: str) -> str:
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


_NON_ASCII = re.compile(r"[^\x00-\x7f]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def ascii_json(json: str) -> str:
    """The same JSON with every non-ASCII character as a `\\u` escape (outside strings JSON is ASCII already), so
    that any server encoding accepts the statement carrying it."""
    return json if json.isascii() else _NON_ASCII.sub(_escape, json)


@functools.lru_cache(maxsize=256)
def _emit_sql_for(json: str) -> tuple[str, str]:
    literal = dollar_quote(ascii_json(json))
    call = f"pg_logical_emit_message(true, '{MESSAGE_PREFIX}', {literal})"  # 3 arguments: PG 17 added a 4th
    return f"SELECT {call} WHERE pg_current_xact_id_if_assigned() IS NOT NULL;", f"SELECT {call};"


def emit_sql(data: ContextData | None, *, conditional: bool = True) -> str:
    """The statement (with its `;`) that emits `data` as a `_bemi` message; None means the empty context `{}`.

    Conditional: only if the transaction already has an xid (it wrote). Cached per context JSON text (its hash is
    computed once per str object), so the hot path does no formatting.
    """
    pair = _emit_sql_for("{}" if data is None else data.json)
    return pair[0] if conditional else pair[1]


def _same(a: ContextData | None, b: ContextData | None) -> bool:
    return a is b or (a is not None and b is not None and a.json == b.json)


# --- the tracked transaction ----------------------------------------------------------------------------------------


class TransactionState(enum.Enum):
    """Where a connection's transaction stands, as the pool tracks it."""

    IDLE = "idle"  # no transaction: each statement is its own, wrapped if its text shows it may write
    STARTED = "started"  # a transaction is open and no statement ran in it yet
    RUNNING = "running"  # statements ran in it; `Transaction.under` is the context the last one ran under
    READ_ONLY = "read only"  # BEGIN ... READ ONLY: the server refuses every write, so nothing is ever owed


class _Savepoint(NamedTuple):
    name: str
    state: TransactionState
    under: ContextData | None
    touched: bool


_COMMITS = frozenset({Step.COMMIT, Step.COMMIT_AND_CHAIN})
_ENDS = frozenset({Step.COMMIT, Step.COMMIT_AND_CHAIN, Step.ROLLBACK, Step.ROLLBACK_AND_CHAIN})
_CHAINS = frozenset({Step.COMMIT_AND_CHAIN, Step.ROLLBACK_AND_CHAIN})


class Transaction:
    """A connection's transaction as the pool tracks it: a `TransactionState` and what the messages need.

    `under` is the context the last statement ran under (the one owed a message), `touched` whether any statement
    ran under a context (then a part with none needs `{}`, or it would take a later message's context), and the
    savepoints hold that state as it was when each was set. `advance` is the only transition.
    """

    __slots__ = ("savepoints", "state", "touched", "under")

    def __init__(self, state: TransactionState = TransactionState.IDLE) -> None:
        self.state = state
        self.under: ContextData | None = None
        self.touched = False
        self.savepoints: list[_Savepoint] = []

    def copy(self) -> Transaction:
        other = Transaction(self.state)
        other.under, other.touched, other.savepoints = self.under, self.touched, list(self.savepoints)
        return other

    def __repr__(self) -> str:
        under = None if self.under is None else self.under.json
        return f"<Transaction {self.state.value} under={under} savepoints={[s.name for s in self.savepoints]}>"

    def advance(self, step: Step, data: ContextData | None, savepoint: str = "") -> str | None:
        """Move past a statement doing `step`, run under context `data`; return the SQL (a `_bemi` message) that
        must run just before it, or None."""
        state = self.state
        if step is Step.BEGIN or step is Step.BEGIN_READ_ONLY:
            if state is TransactionState.IDLE:
                read_only = step is Step.BEGIN_READ_ONLY
                self._restart(TransactionState.READ_ONLY if read_only else TransactionState.STARTED)
            return None  # BEGIN inside a transaction only warns
        if state is TransactionState.IDLE:
            return None
        if step is Step.STATEMENT:
            if state is TransactionState.READ_ONLY:
                return None
            if state is TransactionState.STARTED:
                self.state, self.under, self.touched = TransactionState.RUNNING, data, data is not None
                return None
            previous = self.under
            if _same(data, previous):
                return None
            self.under = data
            self.touched = self.touched or data is not None
            return emit_sql(previous)
        if step in _ENDS:
            message = self._owed_at_commit(data) if step in _COMMITS else None
            if step not in _CHAINS:
                self._restart(TransactionState.IDLE)
            else:  # AND CHAIN: a new transaction with the same characteristics (read only stays read only)
                read_only = state is TransactionState.READ_ONLY
                self._restart(TransactionState.READ_ONLY if read_only else TransactionState.STARTED)
            return message
        if step is Step.NEUTRAL and state is TransactionState.READ_ONLY:
            # SET TRANSACTION READ WRITE may still come before the first query: stop relying on READ ONLY.
            self.state = TransactionState.STARTED
        if step is Step.SAVEPOINT:
            self.savepoints.append(_Savepoint(savepoint, state, self.under, self.touched))
        elif step is Step.RELEASE or step is Step.ROLLBACK_TO:
            for index in range(len(self.savepoints) - 1, -1, -1):
                saved = self.savepoints[index]
                if saved.name == savepoint:
                    if step is Step.ROLLBACK_TO:  # the savepoint stays; what ran after it (messages too) is undone
                        self.state, self.under, self.touched = saved.state, saved.under, saved.touched
                        del self.savepoints[index + 1 :]
                    else:
                        del self.savepoints[index:]
                    break
        return None  # NEUTRAL: SET / SHOW change nothing here

    def _owed_at_commit(self, data: ContextData | None) -> str | None:
        if self.state is TransactionState.READ_ONLY:
            return None
        if self.state is TransactionState.STARTED:  # no statement seen: the context current at COMMIT
            return None if data is None else emit_sql(data)
        if self.under is not None:
            return emit_sql(self.under)
        return emit_sql(None) if self.touched else None

    def _restart(self, state: TransactionState) -> None:
        self.state, self.under, self.touched, self.savepoints = state, None, False, []


def _plan(tx: Transaction, statements: tuple[Statement, ...], data: ContextData | None) -> list[tuple[int, str]]:
    """Advance `tx` over the statements of one simple query; return the messages to insert, with their offsets.

    Inside a transaction block each statement goes through `Transaction.advance`. Outside one, the statements up to
    the next BEGIN / COMMIT / ROLLBACK form one implicit transaction: an unconditional message goes in front of the
    first statement of it that may write (only the context current for this call can be in it).
    """
    inserts: list[tuple[int, str]] = []
    emitted = ran = False  # in the current implicit transaction: a message went in; a statement ran
    for statement in statements:
        step = statement.step
        if tx.state is TransactionState.IDLE:
            if step is Step.BEGIN or step is Step.BEGIN_READ_ONLY:
                tx.advance(step, data)
                if ran:  # BEGIN turns the implicit transaction into this block: what ran is part of it
                    tx.advance(Step.STATEMENT, data)
            elif step in _ENDS:
                emitted = ran = False
            elif step is Step.STATEMENT:
                ran = True
                if statement.writes is not Writes.NO and data is not None and not emitted:
                    inserts.append((statement.offset, emit_sql(data, conditional=False)))
                    emitted = True
        else:
            sql = tx.advance(step, data, statement.savepoint)
            if sql is not None:
                inserts.append((statement.offset, sql))
            if step in _ENDS:  # back outside a block (or in a new one, chained)
                emitted = ran = False
    return inserts


def _splice(query: str, inserts: list[tuple[int, str]]) -> str:
    """Insert each SQL at its byte offset in the UTF-8 text of `query`."""
    if not inserts:
        return query
    if query.isascii():
        parts, last = [], 0
        for offset, sql in inserts:
            parts += [query[last:offset], sql]
            last = offset
        parts.append(query[last:])
        return "".join(parts)
    raw = query.encode()
    chunks, last = [], 0
    for offset, sql in inserts:
        chunks += [raw[last:offset], sql.encode()]
        last = offset
    chunks.append(raw[last:])
    return b"".join(chunks).decode()


_UNREAD = Statement(Step.STATEMENT, Writes.NO, 0)  # text the parser cannot read: the server will refuse it too
_COPY_IN = Statement(Step.STATEMENT, Writes.YES, 0)
_NOT_PLAIN = Statement(Step.NEUTRAL, Writes.NO, 0)  # `_Shape.plain` of a text planned statement by statement


class _Shape(NamedTuple):
    """What the connection needs to know of a query string, worked out once per text."""

    statements: tuple[Statement, ...]
    alone: Statement  # the statement when the text holds exactly one (calls with arguments take only one)
    plain: Statement  # the whole text as one statement when it holds no transaction control and no SET / SHOW
    control: bool  # it holds transaction control: the statements must be planned one by one
    sets: bool  # it holds a SET / SHOW, in front of which no message may go
    writes: Writes  # the strongest judgement among its statements (used outside a transaction only)


def _make_shape(query: str) -> _Shape:
    statements = read(query) or (_UNREAD,)
    alone = statements[0] if len(statements) == 1 else _UNREAD
    control = any(s.step is not Step.STATEMENT and s.step is not Step.NEUTRAL for s in statements)
    sets = any(s.step is Step.NEUTRAL for s in statements)
    writes = max((s.writes for s in statements), default=Writes.NO)
    plain = _NOT_PLAIN if control or sets else Statement(Step.STATEMENT, writes, 0)
    return _Shape(statements, alone, plain, control, sets, writes)


_shape_cached = functools.lru_cache(maxsize=4096)(_make_shape)


def _shape(query: str) -> _Shape:
    return _shape_cached(query) if len(query) <= CACHED_LENGTH else _make_shape(query)


# --- the connection -------------------------------------------------------------------------------------------------


class BemiConnection(_Connection):
    """An `asyncpg.Connection` whose written transactions carry the current Bemi context into the WAL.

    Use it through `create_pool` / `connect`, or pass `connection_class=BemiConnection` to asyncpg yourself.
    """

    _bemi: Transaction

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._bemi = Transaction()

    # -- the tracked state, kept in step with the server --

    def _bemi_passes(self, statement: Statement) -> bool:
        """Whether `statement` runs as it is, with nothing sent around it; if so the tracked state has moved past it.

        The hot path of every call: a few attribute reads, no allocation. False leaves everything to `_bemi_run`
        (transaction control, a context switch, a statement to wrap, a state to align with the server's).
        """
        if statement.step is not Step.STATEMENT:
            return False
        tx = self._bemi
        state = tx.state
        if not self.is_in_transaction():
            return state is TransactionState.IDLE and (statement.writes is Writes.NO or current() is None)
        if state is TransactionState.RUNNING:
            return current() is tx.under  # the same context object: no switch (another one: `advance` judges)
        if state is TransactionState.STARTED:
            data = current()
            tx.state, tx.under, tx.touched = TransactionState.RUNNING, data, data is not None
            return True
        return state is TransactionState.READ_ONLY

    def _bemi_tracked(self) -> Transaction:
        """The tracked transaction, first aligned with the server's transaction status."""
        tx = self._bemi
        if not self.is_in_transaction():
            if tx.state is not TransactionState.IDLE:
                tx = self._bemi = Transaction()
        elif tx.state is TransactionState.IDLE:  # a transaction began out of sight (an asyncpg internal, say)
            tx = self._bemi = Transaction(TransactionState.STARTED)
        return tx

    def _bemi_settle(self, planned: Transaction, data: ContextData | None) -> None:
        """Keep `planned` as the state after a call, corrected by what the server says."""
        if not self.is_in_transaction():
            planned = Transaction() if planned.state is not TransactionState.IDLE else planned
        elif planned.state is TransactionState.IDLE:  # a transaction left open that the plan did not foresee
            planned = Transaction(TransactionState.STARTED)
            planned.advance(Step.STATEMENT, data)  # whatever ran in it ran under this call's context
        self._bemi = planned

    async def _bemi_emit(self, sql: str, *, commit: bool) -> bool:
        """Send a message on its own; False when the transaction had already failed (the message is moot)."""
        try:
            await _Connection.execute(self, sql)
        except asyncpg.InFailedSQLTransactionError:
            return False
        except asyncpg.PostgresError as exc:
            raise await self._bemi_emit_failed(exc, commit) from exc
        return True

    async def _bemi_emit_failed(self, exc: asyncpg.PostgresError, commit: bool) -> SourceNotReadyError:
        """Roll back the transaction the failed message left aborted; the error to raise."""
        if commit and self.is_in_transaction() and not self.is_closed():
            with contextlib.suppress(Exception):
                await _Connection.execute(self, "ROLLBACK")
            self._bemi = Transaction()
        what = "the transaction was rolled back" if commit else "the transaction is aborted: roll it back"
        return SourceNotReadyError(
            f"could not write the Bemi context message ({type(exc).__name__}: {exc}), so {what}. The source "
            "database needs wal_level=logical, and the application's role EXECUTE on pg_logical_emit_message "
            "(every role has it unless revoked); `bemi-asgi doctor` checks the source"
        )

    # -- simple query protocol --

    async def execute(self, query: str, *args: object, timeout: float | None = None) -> str:  # noqa: ASYNC109
        if args:
            if self._bemi_passes(_shape(query).alone):
                return await _Connection.execute(self, query, *args, timeout=timeout)
            return await self._bemi_run(query, super().execute, query, *args, timeout=timeout)
        shape = _shape(query)
        parent = _Connection.execute
        plain = shape.plain
        if plain.step is Step.STATEMENT and self._bemi_passes(plain):  # nothing to send
            return await parent(self, query, timeout=timeout)
        tx = self._bemi_tracked()
        statements, _, _, control, sets, writes = shape
        if len(statements) == 1 and (control or sets):  # one control statement or SET: move past it here, no plan
            statement = statements[0]
            step = statement.step
            # Of these, only a COMMIT of a transaction in which nothing ran yet reads the context (it is owed the
            # one current at COMMIT): BEGIN and COMMIT, twice a transaction, skip taking it.
            data = current() if step in _COMMITS and tx.state is TransactionState.STARTED else None
            message = tx.advance(step, data, statement.savepoint)
            if message is None:
                return await parent(self, query, timeout=timeout)
            try:  # only COMMITs owe a message: in front, in the same round trip
                return await parent(self, message + query, timeout=timeout)
            except asyncpg.PostgresError as exc:
                return await self._bemi_commit_failed(exc, query, timeout)
        data = current()
        idle = tx.state is TransactionState.IDLE
        if not control and idle and (data is None or writes is Writes.NO):  # nothing to send, nothing to track
            return await parent(self, query, timeout=timeout)
        if not control and not sets:  # the common case: at most one message, in front
            if not idle:
                owed = tx.advance(Step.STATEMENT, data)
                return await parent(self, query if owed is None else owed + query, timeout=timeout)
            if data is None or writes is Writes.NO:
                return await parent(self, query, timeout=timeout)
            if writes is Writes.MAYBE and len(statements) == 1:  # only calls that may write: emit if they did
                return await self._bemi_wrap(data, super().execute, query, timeout=timeout)
            # One implicit transaction: the message first (an appended statement would replace the status).
            return await parent(self, emit_sql(data, conditional=False) + query, timeout=timeout)
        planned = tx.copy()
        inserts = _plan(planned, statements, data)
        try:
            return await parent(self, _splice(query, inserts), timeout=timeout)
        finally:
            self._bemi_settle(planned, data)

    async def _bemi_commit_failed(self, exc: asyncpg.PostgresError, query: str, timeout: float | None) -> str:  # noqa: ASYNC109
        """After COMMIT (or PREPARE TRANSACTION) `query` with its message in front failed with `exc`. The tracked
        state has moved past it already; only a failed message changes it again."""
        if not self.is_in_transaction():  # COMMIT itself ran and failed (a deferred constraint, say)
            raise exc
        if isinstance(exc, asyncpg.InFailedSQLTransactionError):
            # The transaction had failed before: COMMIT rolls it back without an error, as without the pool.
            return await _Connection.execute(self, query, timeout=timeout)
        raise await self._bemi_emit_failed(exc, True) from exc

    # -- extended query protocol, COPY, prepared statements, cursors --

    async def _bemi_run(self, query: str | None, fn: Callable[..., Awaitable[T]], /, *args: Any, **kwargs: Any) -> T:
        """Run `fn(*args, **kwargs)`, one statement with text `query` (None: COPY FROM STDIN), with the context."""
        data = current()
        tx = self._bemi_tracked()
        statement = _COPY_IN if query is None else _shape(query).alone
        if statement.step is Step.STATEMENT:  # the common case: no transaction control, nothing to plan
            if tx.state is not TransactionState.IDLE:
                sql = tx.advance(Step.STATEMENT, data)
                if sql is not None:
                    await self._bemi_emit(sql, commit=False)
            elif data is not None and statement.writes is not Writes.NO:
                return await self._bemi_wrap(data, fn, *args, **kwargs)
            return await fn(*args, **kwargs)
        planned = tx.copy()
        sql = planned.advance(statement.step, data, statement.savepoint)
        if sql is not None:
            await self._bemi_emit(sql, commit=statement.step in _COMMITS)
        try:
            return await fn(*args, **kwargs)
        finally:
            self._bemi_settle(planned, data)

    async def _bemi_wrap(self, data: ContextData, fn: Callable[..., Awaitable[T]], /, *args: Any, **kwargs: Any) -> T:
        """Run `fn` as its own transaction: BEGIN / statement / message + COMMIT."""
        await _Connection.execute(self, "BEGIN")
        self._bemi = Transaction(TransactionState.STARTED)
        self._bemi.advance(Step.STATEMENT, data)
        try:
            result = await fn(*args, **kwargs)
        except BaseException:
            if self.is_in_transaction() and not self.is_closed():
                with contextlib.suppress(Exception):  # broken or busy: the pool's reset rolls back
                    await _Connection.execute(self, "ROLLBACK")
            self._bemi = Transaction()
            raise
        self._bemi = Transaction()
        try:
            await _Connection.execute(self, emit_sql(data) + "COMMIT")
        except asyncpg.PostgresError as exc:
            await self._bemi_commit_failed(exc, "COMMIT", None)
        return result

    async def _bemi_before_cursor(self) -> None:
        """A cursor's bind or fetch runs statements in the transaction: a statement under the current context."""
        sql = self._bemi_tracked().advance(Step.STATEMENT, current())
        if sql is not None:
            await self._bemi_emit(sql, commit=False)

    async def executemany(self, command: str, args: Any, *, timeout: float | None = None) -> None:  # noqa: ASYNC109
        if self._bemi_passes(_shape(command).alone):
            return await _Connection.executemany(self, command, args, timeout=timeout)
        await self._bemi_run(command, super().executemany, command, args, timeout=timeout)

    async def fetch(self, query: str, *args: object, timeout: float | None = None, record_class: Any = None) -> Any:  # noqa: ASYNC109
        if self._bemi_passes(_shape(query).alone):
            return await _Connection.fetch(self, query, *args, timeout=timeout, record_class=record_class)
        return await self._bemi_run(query, super().fetch, query, *args, timeout=timeout, record_class=record_class)

    async def fetchval(self, query: str, *args: object, column: int = 0, timeout: float | None = None) -> Any:  # noqa: ASYNC109
        if self._bemi_passes(_shape(query).alone):
            return await _Connection.fetchval(self, query, *args, column=column, timeout=timeout)
        return await self._bemi_run(query, super().fetchval, query, *args, column=column, timeout=timeout)

    async def fetchrow(self, query: str, *args: object, timeout: float | None = None, record_class: Any = None) -> Any:  # noqa: ASYNC109
        if self._bemi_passes(_shape(query).alone):
            return await _Connection.fetchrow(self, query, *args, timeout=timeout, record_class=record_class)
        return await self._bemi_run(query, super().fetchrow, query, *args, timeout=timeout, record_class=record_class)

    async def fetchmany(self, query: str, args: Any, *, timeout: float | None = None, record_class: Any = None) -> Any:  # noqa: ASYNC109
        if self._bemi_passes(_shape(query).alone):
            return await _Connection.fetchmany(self, query, args, timeout=timeout, record_class=record_class)
        return await self._bemi_run(query, super().fetchmany, query, args, timeout=timeout, record_class=record_class)

    async def copy_to_table(self, table_name: str, **kwargs: Any) -> str:
        return await self._bemi_run(None, super().copy_to_table, table_name, **kwargs)

    async def copy_records_to_table(self, table_name: str, **kwargs: Any) -> str:
        return await self._bemi_run(None, super().copy_records_to_table, table_name, **kwargs)

    async def copy_from_query(self, query: str, *args: object, **kwargs: Any) -> str:
        # COPY (INSERT ... RETURNING ...) TO STDOUT writes.
        return await self._bemi_run(query, super().copy_from_query, query, *args, **kwargs)

    def cursor(self, query: str, *args: object, **kwargs: Any) -> Any:
        factory = super().cursor(query, *args, **kwargs)
        factory.__class__ = BemiCursorFactory
        return factory

    async def reset(self, *, timeout: float | None = None) -> None:  # noqa: ASYNC109
        # The pool resets a connection on release, maybe inside the caller's context and span: asyncpg's own
        # statements, no write of theirs, so they run as on a plain connection (asyncpg's `reset`, whose query would
        # otherwise come through `execute` above and gain the span's trace).
        async with asyncio.timeout(timeout):
            await self._reset()
            query = reset_query(self)
            if query:
                await _Connection.execute(self, query)
        if self._bemi.state is not TransactionState.IDLE:
            self._bemi = Transaction()

    async def prepare(self, query: str, **kwargs: Any) -> Any:
        statement = await super().prepare(query, **kwargs)
        # Same slots, one wrapper object: replacing it would let the original's __del__ free the shared state.
        statement.__class__ = BemiPreparedStatement
        return statement


class _CursorHooks:
    """Cursor methods that run statements first tell the connection, which may owe a message."""

    __slots__ = ()
    _connection: BemiConnection

    async def _bind_exec(self, n: int, timeout: float | None) -> Any:  # noqa: ASYNC109
        await self._connection._bemi_before_cursor()
        return await super()._bind_exec(n, timeout)  # type: ignore[misc]

    async def _bind(self, timeout: float | None) -> Any:  # noqa: ASYNC109
        await self._connection._bemi_before_cursor()
        return await super()._bind(timeout)  # type: ignore[misc]

    async def _exec(self, n: int, timeout: float | None) -> Any:  # noqa: ASYNC109
        await self._connection._bemi_before_cursor()
        return await super()._exec(n, timeout)  # type: ignore[misc]


class BemiCursor(_CursorHooks, Cursor):
    __slots__ = ()


class BemiCursorIterator(_CursorHooks, CursorIterator):
    __slots__ = ()


class BemiCursorFactory(CursorFactory):
    """asyncpg's cursor factory, making cursors whose statements the connection sees."""

    __slots__ = ()

    def __aiter__(self) -> Any:
        iterator = super().__aiter__()
        iterator.__class__ = BemiCursorIterator
        return iterator

    def __await__(self) -> Any:
        if self._prefetch is not None:  # type: ignore[attr-defined]
            raise asyncpg.InterfaceError("prefetch argument can only be specified for iterable cursor")
        cursor = BemiCursor(self._connection, self._query, self._state, self._args, self._record_class)  # type: ignore[attr-defined]
        return cursor._init(self._timeout).__await__()  # type: ignore[attr-defined]


class BemiPreparedStatement(_Statement):
    """A prepared statement of a `BemiConnection`: its executions carry the context like the connection's."""

    __slots__ = ()

    def _bemi(self) -> tuple[BemiConnection, str]:
        return self._connection, self._query  # type: ignore[attr-defined]

    def cursor(self, *args: object, **kwargs: Any) -> Any:
        factory = super().cursor(*args, **kwargs)
        factory.__class__ = BemiCursorFactory
        return factory

    async def fetch(self, *args: object, timeout: float | None = None) -> Any:  # noqa: ASYNC109
        conn, query = self._bemi()
        if conn._bemi_passes(_shape(query).alone):
            return await _Statement.fetch(self, *args, timeout=timeout)
        return await conn._bemi_run(query, super().fetch, *args, timeout=timeout)

    async def fetchval(self, *args: object, column: int = 0, timeout: float | None = None) -> Any:  # noqa: ASYNC109
        conn, query = self._bemi()
        if conn._bemi_passes(_shape(query).alone):
            return await _Statement.fetchval(self, *args, column=column, timeout=timeout)
        return await conn._bemi_run(query, super().fetchval, *args, column=column, timeout=timeout)

    async def fetchrow(self, *args: object, timeout: float | None = None) -> Any:  # noqa: ASYNC109
        conn, query = self._bemi()
        if conn._bemi_passes(_shape(query).alone):
            return await _Statement.fetchrow(self, *args, timeout=timeout)
        return await conn._bemi_run(query, super().fetchrow, *args, timeout=timeout)

    async def fetchmany(self, args: Any, *, timeout: float | None = None) -> Any:  # noqa: ASYNC109
        conn, query = self._bemi()
        if conn._bemi_passes(_shape(query).alone):
            return await _Statement.fetchmany(self, args, timeout=timeout)
        return await conn._bemi_run(query, super().fetchmany, args, timeout=timeout)

    async def executemany(self, args: Any, *, timeout: float | None = None) -> None:  # noqa: ASYNC109
        conn, query = self._bemi()
        if conn._bemi_passes(_shape(query).alone):
            return await _Statement.executemany(self, args, timeout=timeout)
        await conn._bemi_run(query, super().executemany, args, timeout=timeout)


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

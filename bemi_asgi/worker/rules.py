"""Table and column rules applied to decoded rows, before anything is written (memory, spill file or destination).

The worker asks `Filters` once per Relation message (so once per table and schema change, not per row):

- `tracks(schema, table)`: False for a table the rules leave out; the worker then drops its changes as it does
  for its own tables.
- `policy(...)`: a `RowPolicy` for a table with column rules (or when no-op updates are dropped), else None.

The fast path (`fastpath.RowCodec`) applies a table's policy as it reads a frame's bytes (a masked value is not
even decoded); on the general path a `RowPolicy` works on the raw value tuples of pgoutput's text format, before
the values are converted to JSON: ignored columns are cut out of the tuple, masked values become the marker,
hashed values their HMAC-SHA256 in hex. The original text of a masked or hashed value is never converted, copied
or formatted into a message, so it cannot end up in a row, a spill file, a log line or an error. NULL stays NULL
(a mask hides a value, not its absence), and an unchanged TOASTed value stays UNCHANGED (the worker then fills it
from the old row, already filtered).

Hashes are of the value's text as PostgreSQL prints it (`42`, `t`, `alice@example.com`), keyed with the secret
from the configuration: `hash_value(value, key=...)` computes the same to search with, and so does SQL with
pgcrypto: `encode(hmac(value::text, key, 'sha256'), 'hex')`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Protocol

from .._exceptions import ConfigError
from .._hmac import hmac_sha256
from ..capture.context import SKIP_KEY
from .config import DEFAULT_HASH_KEY_ENV, ColumnRules, TrackingConfig
from .pgoutput import UNCHANGED, Column, Value

__all__ = [
    "SKIP_KEY",
    "Filters",
    "Hasher",
    "RowPolicy",
    "check_tables",
    "filter_relation",
    "hash_text",
    "hash_value",
    "is_skip_context",
]

logger = logging.getLogger("bemi_asgi.worker")

_SKIP_BYTES = SKIP_KEY.encode()


def hash_text(key: bytes, text: str) -> str:
    """HMAC-SHA256 of `text` (UTF-8) under `key`, in lower-case hex: what a hashed column stores."""
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def hash_value(value: str | int | bool, *, key: str | bytes | None = None) -> str:
    """The stored form of a hashed column's value, to search with: `find(after={"email": hash_value(email)})`.

    `value` is the value's text as PostgreSQL prints it (for a bool: True is `t`; an int its digits); `key` the
    worker's hash key (default: the BEMI_HASH_KEY environment variable).
    """
    if key is None:
        key = os.environ.get(DEFAULT_HASH_KEY_ENV)
        if not key:
            raise ConfigError(f"no hash key: pass key=... or set {DEFAULT_HASH_KEY_ENV} to the worker's hash key")
    raw = key.encode() if isinstance(key, str) else key
    if isinstance(value, bool):
        text = "t" if value else "f"
    elif isinstance(value, int):
        text = str(value)
    elif isinstance(value, str):
        text = value
    else:
        raise TypeError(f"hash_value takes the value's text (str), an int or a bool, not {type(value).__name__}")
    return hash_text(raw, text)


def is_skip_context(content: bytes, text: str) -> bool:
    """Whether a `_bemi` message (raw payload, and its text as stored) asks to drop its transaction."""
    if _SKIP_BYTES not in content:  # almost every message: no JSON parsing on the way
        return False
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return isinstance(value, dict) and value.get(SKIP_KEY) is True


class Hasher:
    """`hash_text` under one key, for every hashed value: HMAC-SHA256 with the key's padded blocks hashed once
    (`_hmac`; `hmac.new` per value cost several times more: OpenSSL sets up its HMAC context each time). Its repr
    never shows the key (a partial would)."""

    __slots__ = ("_mac",)

    def __init__(self, key: bytes) -> None:
        self._mac = hmac_sha256(key)

    def __call__(self, text: str) -> str:
        return self._mac(text.encode()).hex()

    def __repr__(self) -> str:
        return "<HMAC-SHA256, key hidden>"


def _identity(text: str) -> str:
    return text


class _Masker:
    """A masked column's transform: the marker, whatever the value. `constant` tells the fast path it need not
    read the value at all."""

    __slots__ = ("constant",)

    def __init__(self, marker: str) -> None:
        self.constant = marker

    def __call__(self, _text: str) -> str:
        return self.constant


@dataclass(frozen=True, slots=True)
class RowPolicy:
    """How one table's rows are filtered. Positions refer to the Relation message's columns."""

    columns: tuple[Column, ...]  # the columns kept, in order
    keep: tuple[int, ...] | None  # positions kept (None: all, nothing ignored)
    transforms: tuple[tuple[int, Callable[[str], str]], ...]  # (position in the kept tuple, mask or hash)
    ignored: frozenset[int]  # positions ignored
    drop_noop: bool

    def row(self, values: tuple[Value, ...]) -> tuple[Value, ...]:
        """The values stored for `values`: ignored columns cut, masked and hashed ones replaced."""
        keep = self.keep
        if keep is not None:
            values = tuple([values[i] for i in keep])
        if self.transforms:
            out = list(values)
            for i, transform in self.transforms:
                value = out[i]
                if value is not None and value is not UNCHANGED:
                    out[i] = transform(value)
            values = tuple(out)
        return values

    def drops_update(self, old: tuple[Value, ...], new: tuple[Value, ...]) -> bool:
        """Whether an UPDATE with this full old row stores nothing: it changed only ignored columns, or nothing
        at all and no-op updates are dropped. Compared on the original texts, so a change to a masked or hashed
        column counts."""
        ignored = self.ignored
        touched_ignored = False
        for i, (before, after) in enumerate(zip(old, new, strict=True)):
            if after is UNCHANGED or after == before:
                continue
            if i not in ignored:
                return False
            touched_ignored = True
        return touched_ignored or self.drop_noop

    def position(self, original: int) -> int | None:
        """Where the column at `original` lands in the filtered tuple (None when ignored)."""
        if self.keep is None:
            return original
        return self.keep.index(original) if original in self.keep else None


class Filters:
    """The compiled rules of a `TrackingConfig`."""

    def __init__(self, config: TrackingConfig) -> None:
        self.config = config
        self._mask = config.mask_marker
        self._hash = Hasher(config.hash_key) if config.hash_key is not None else None

    def tracks(self, schema: str, table: str, ancestors: Sequence[str] = ()) -> bool:
        """False when `include` is given and no pattern matches, or an `exclude` pattern matches. `ancestors`: the
        partitioned tables (`schema.table`) a partition belongs to, whose patterns apply to it too."""
        names = (f"{schema}.{table}", *ancestors)
        config = self.config
        if config.include and not any(fnmatchcase(n, pattern) for n in names for pattern in config.include):
            return False
        return not any(fnmatchcase(n, pattern) for n in names for pattern in config.exclude)

    def rules(self, schema: str, table: str, ancestors: Sequence[str] = ()) -> ColumnRules:
        """The column rules of every pattern matching the table or a partitioned table it belongs to, added up:
        a partition keeps its partitioned table's rules whether the publication sends it under its own name or
        under its root's."""
        names = (f"{schema}.{table}", *ancestors)
        found = ColumnRules()
        for pattern, rules in self.config.tables:
            if any(fnmatchcase(name, pattern) for name in names):
                found = found.merged(rules)
        return found

    def problems(
        self, schema: str, table: str, columns: Sequence[str], key: Sequence[str], ancestors: Sequence[str] = ()
    ) -> list[str]:
        """What is wrong with the rules for this table: rules of an exact (wildcard-free) pattern naming columns
        it lacks (a typo would store the value in clear), and ignored or masked primary key columns."""
        name = f"{schema}.{table}"
        names = (name, *ancestors)
        problems: list[str] = []
        for pattern, rules in self.config.tables:
            if pattern in names:
                for kind in ("ignore", "mask", "hash"):
                    missing = sorted(set(getattr(rules, kind)) - set(columns))
                    if missing:
                        problems.append(
                            f"{name} has no column {', '.join(missing)} (in its {kind} rule): fix the name, or "
                            "remove it from the rule"
                        )
        rules = self.rules(schema, table, ancestors)
        for column in key:
            if column in rules.ignore or column in rules.mask:
                kind = "ignored" if column in rules.ignore else "masked"
                problems.append(
                    f"{name}.{column} is {kind}, but it is part of the primary key, which every change stores (and "
                    "which identifies the row's history): hash it instead, or leave it out of the rule"
                )
        return problems

    def policy(
        self, schema: str, table: str, columns: Sequence[Column], key: Sequence[str], ancestors: Sequence[str] = ()
    ) -> RowPolicy | None:
        """The table's RowPolicy, None when nothing applies. Raises ConfigError for an ignored or masked key column."""
        rules = self.rules(schema, table, ancestors)
        if not (rules.ignore or rules.mask or rules.hash or self.config.drop_noop_updates):
            return None
        bad = [column for column in key if column in rules.ignore or column in rules.mask]
        if bad:
            raise ConfigError(self.problems(schema, table, [c.name for c in columns], key, ancestors)[-1])
        ignored = frozenset(i for i, column in enumerate(columns) if column.name in rules.ignore)
        keep = tuple(i for i in range(len(columns)) if i not in ignored) if ignored else None
        kept = [columns[i] for i in keep] if keep is not None else list(columns)
        transforms: list[tuple[int, Callable[[str], str]]] = []
        for i, column in enumerate(kept):
            # Strictest first: mask over hash when several patterns name a column.
            if column.name in rules.mask:
                transforms.append((i, _Masker(self._mask)))
            elif column.name in rules.hash:
                if self._hash is None:
                    raise ConfigError(f"{schema}.{table}.{column.name} is hashed, but no hash key is configured")
                transforms.append((i, self._hash))
        return RowPolicy(tuple(kept), keep, tuple(transforms), ignored, self.config.drop_noop_updates)


class _Relation(Protocol):
    """What `filter_relation` reads and sets on the worker's per-relation record."""

    schema: str
    table: str
    columns: tuple[Column, ...]
    converters: tuple[Callable[[str], Any], ...]
    key: tuple[int, ...]
    replica_key: tuple[int, ...]
    ignored: bool
    policy: RowPolicy | None


def filter_relation(filters: Filters, rel: _Relation, ancestors: Sequence[str] = ()) -> None:
    """Apply the rules to a relation the worker just read: leave it out, or give it a RowPolicy and the columns,
    converters and key positions of the filtered rows. Raises ConfigError for an ignored or masked key column.
    `ancestors`: the partitioned tables the relation is a partition of, as `schema.table`."""
    if not filters.tracks(rel.schema, rel.table, ancestors):
        rel.ignored = True
        return
    key_names = [rel.columns[i].name for i in rel.key]
    columns = [column.name for column in rel.columns]
    for problem in filters.problems(rel.schema, rel.table, columns, key_names, ancestors):
        logger.warning("%s", problem)  # missing columns only: key problems raise just below
    policy = filters.policy(rel.schema, rel.table, rel.columns, key_names, ancestors)
    if policy is None:
        return
    converters = [rel.converters[i] for i in policy.keep] if policy.keep is not None else list(rel.converters)
    for i, _ in policy.transforms:
        converters[i] = _identity  # the marker or the hash is stored as text, whatever the column type
    rel.policy = policy
    rel.columns = policy.columns
    rel.converters = tuple(converters)
    rel.key = tuple(position for i in rel.key if (position := policy.position(i)) is not None)
    rel.replica_key = tuple(position for i in rel.replica_key if (position := policy.position(i)) is not None)


async def check_tables(dsn: str, publication: str, filters: Filters) -> None:
    """Check the column rules against the published tables of the source: raise ConfigError listing every rule
    that names a column its table lacks, every ignored or masked primary key column, and every exact (wildcard-free)
    table pattern that matches no published table or partitioned table one belongs to (a typo, or a partition whose
    changes arrive under its root's name: the rule would never apply). A wildcard pattern matching nothing yet is
    logged, not refused (it may be meant for tables created later)."""
    import psycopg

    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cursor = await conn.execute(
            """
            SELECT n.nspname::text, c.relname::text,
                   array(SELECT a.attname::text FROM pg_attribute a
                         WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum),
                   array(SELECT a.attname::text
                         FROM pg_index i CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n)
                         JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                         WHERE i.indrelid = c.oid AND i.indisprimary ORDER BY k.n),
                   array(SELECT an.nspname::text || '.' || ac.relname::text
                         FROM pg_partition_ancestors(c.oid) a JOIN pg_class ac ON ac.oid = a.relid
                         JOIN pg_namespace an ON an.oid = ac.relnamespace WHERE a.relid <> c.oid)
            FROM pg_publication_tables pt
            JOIN pg_namespace n ON n.nspname = pt.schemaname
            JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename
            WHERE pt.pubname = %s
            ORDER BY 1, 2
            """,
            [publication],
        )
        rows = await cursor.fetchall()
    problems: list[str] = []
    names: list[str] = []
    for schema, table, columns, key, ancestors in rows:
        names += [f"{schema}.{table}", *ancestors]
        if filters.tracks(schema, table, ancestors):
            problems += filters.problems(schema, table, columns, key, ancestors)
    for pattern, _ in filters.config.tables:
        if not any(fnmatchcase(name, pattern) for name in names):
            if any(char in pattern for char in "*?["):
                logger.warning("the rule for %s matches no published table yet", _printable(pattern))
            else:
                problems.append(
                    f"the rule for {_printable(pattern)} matches no published table (nor a partitioned table one "
                    f"belongs to) of publication {_printable(publication)}, so it would never apply: fix the name, "
                    "or give the rule to the table the changes arrive under (a partition's changes arrive under "
                    "its partitioned table's name with publish_via_partition_root)"
                )
    if problems:
        raise ConfigError("the tracking configuration does not fit the tables: " + "; ".join(problems))


def _printable(text: str) -> str:
    """A name for a message: quoted with its control characters escaped, so it cannot forge lines."""
    return json.dumps(text, ensure_ascii=False)

"""The worker's tracking configuration: which tables, which columns ignored, masked or hashed, what is dropped.

One place: a TOML file (`--config bemi.toml` or `BEMI_CONFIG`), read with the standard library's `tomllib`, and
command line options that add to it. Every key is checked when the configuration is loaded, and an unknown key is
an error: a typo in a privacy rule must not silently store a secret in clear.

    include = ["public.*", "billing.invoices"]     # tables to track (glob patterns on schema.table); [] = all
    exclude = ["public.sessions", "audit.*"]       # never tracked, even when included
    drop_noop_updates = true                        # an UPDATE that changed nothing stores nothing
    hash_key_env = "BEMI_HASH_KEY"                  # environment variable holding the hash key (the default)
    mask_marker = "[masked]"                        # what a masked value is stored as (the default)
    honor_skip = true                               # transactions under skip_tracking() are dropped (the default)

    [tables."public.users"]                         # a schema.table glob pattern
    ignore = ["updated_at"]                         # never stored anywhere; an UPDATE touching only these: nothing
    mask = ["password_hash"]                        # stored as mask_marker
    hash = ["email"]                                # stored as hex HMAC-SHA256 of the value's text

Table patterns are `schema.table` with `*` and `?` wildcards, matched against the names as the catalog spells
them; a pattern without a dot is a table of the schema `public`. When several `[tables]` patterns match a table,
their rules add up, and a column named by several takes the strictest: ignore, then mask, then hash.

The checks that need the database (a rule naming a column the table lacks, an ignored or masked primary key
column) are in `rules.check_tables`, which the worker runs against the source's catalog when it starts.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._exceptions import ConfigError

__all__ = ["ColumnRules", "TrackingConfig", "load_config", "parse_column_option", "parse_table_pattern"]

DEFAULT_HASH_KEY_ENV = "BEMI_HASH_KEY"
DEFAULT_MASK_MARKER = "[masked]"
#: Shorter keys make the hashes of guessable values (emails, phone numbers) cheap to brute-force.
MIN_HASH_KEY_BYTES = 16

_TOP_KEYS = frozenset(
    {"include", "exclude", "drop_noop_updates", "hash_key_env", "mask_marker", "honor_skip", "tables"}
)
_RULE_KEYS = ("ignore", "mask", "hash")


@dataclass(frozen=True, slots=True)
class ColumnRules:
    """The column rules of one table pattern."""

    ignore: frozenset[str] = frozenset()
    mask: frozenset[str] = frozenset()
    hash: frozenset[str] = frozenset()

    def merged(self, other: ColumnRules) -> ColumnRules:
        return ColumnRules(self.ignore | other.ignore, self.mask | other.mask, self.hash | other.hash)


@dataclass(frozen=True, slots=True)
class TrackingConfig:
    """What the worker stores: `include`/`exclude` table patterns, per-pattern column rules, no-op updates."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    tables: tuple[tuple[str, ColumnRules], ...] = ()  # (schema.table pattern, rules), in the order given
    drop_noop_updates: bool = False
    hash_key: bytes | None = field(default=None, repr=False)  # never printed
    mask_marker: str = DEFAULT_MASK_MARKER
    honor_skip: bool = True

    def recorded_rules(self) -> dict[str, Any]:
        """The column rules as the worker records them in `bemi.tracking_rules` (no key, nothing secret)."""
        return {
            "mask_marker": self.mask_marker,
            "tables": [
                [pattern, {kind: sorted(getattr(rules, kind)) for kind in _RULE_KEYS}] for pattern, rules in self.tables
            ],
        }

    @property
    def filters_rows(self) -> bool:
        """Whether any table or column rule, or the no-op update rule, is configured."""
        return bool(self.include or self.exclude or self.tables or self.drop_noop_updates)


def parse_table_pattern(text: str, *, where: str) -> str:
    """`schema.table` glob pattern, `public.` added when there is no schema; refuses empty parts."""
    pattern = text.strip()
    if "." not in pattern:
        pattern = f"public.{pattern}"
    schema, _, table = pattern.partition(".")
    if not schema or not table or "\x00" in pattern:
        raise ConfigError(
            f"{text!r} in {where} is not a table pattern: write schema.table, with * and ? as wildcards "
            "(e.g. public.users, public.*, *.audit_log)"
        )
    return pattern


def parse_column_option(text: str, *, where: str) -> tuple[str, str]:
    """`schema.table.column` (or `table.column` in public) -> (table pattern, column)."""
    table, dot, column = text.strip().rpartition(".")
    if not dot or not table or not column:
        raise ConfigError(
            f"{text!r} in {where} is not a column: write schema.table.column (e.g. public.users.email, or "
            "*.*.updated_at for every table)"
        )
    return parse_table_pattern(table, where=where), column


def load_config(
    path: str | Path | None = None,
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    ignore_columns: Sequence[str] = (),
    mask_columns: Sequence[str] = (),
    hash_columns: Sequence[str] = (),
    drop_noop_updates: bool = False,
    environ: Mapping[str, str] | None = None,
) -> TrackingConfig:
    """Read the TOML file at `path` (when given) and add the command line options to it.

    Raises ConfigError saying which key is wrong and how to fix it. The hash key is read from the environment
    (`hash_key_env`, default BEMI_HASH_KEY) only when some column is hashed.
    """
    environ = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    where = "the options"
    if path is not None:
        where = str(path)
        try:
            with open(path, "rb") as file:
                data = tomllib.load(file)
        except FileNotFoundError:
            raise ConfigError(f"the configuration file {path} does not exist: check --config / BEMI_CONFIG") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(unknown)} in {where}: the keys are {', '.join(sorted(_TOP_KEYS))} "
            '(column rules go under [tables."schema.table"])'
        )
    includes = [*_patterns(data.get("include", []), "include", where), *_patterns(include, "--include", "--include")]
    excludes = [*_patterns(data.get("exclude", []), "exclude", where), *_patterns(exclude, "--exclude", "--exclude")]
    rules: dict[str, ColumnRules] = {}
    tables = data.get("tables", {})
    if not isinstance(tables, dict):
        raise ConfigError(f'tables in {where} must be a table of [tables."schema.table"] sections')
    for key, value in tables.items():
        pattern = parse_table_pattern(key, where=f'[tables."{key}"] in {where}')
        rules[pattern] = rules.get(pattern, ColumnRules()).merged(_rules(value, f'[tables."{key}"] in {where}'))
    for option, values in (("--ignore-column", ignore_columns), ("--mask-column", mask_columns),
                           ("--hash-column", hash_columns)):  # fmt: skip
        for text in values:
            pattern, column = parse_column_option(text, where=option)
            kind = option.removeprefix("--").removesuffix("-column")
            added = ColumnRules(**{kind: frozenset({column})})
            rules[pattern] = rules.get(pattern, ColumnRules()).merged(added)
    drop_noop = _bool(data.get("drop_noop_updates", False), "drop_noop_updates", where) or drop_noop_updates
    honor_skip = _bool(data.get("honor_skip", True), "honor_skip", where)
    marker = data.get("mask_marker", DEFAULT_MASK_MARKER)
    if not isinstance(marker, str) or "\x00" in marker:
        raise ConfigError(f'mask_marker in {where} must be a string (without NUL), e.g. "[masked]"')
    key_env = data.get("hash_key_env", DEFAULT_HASH_KEY_ENV)
    if not isinstance(key_env, str) or not key_env:
        raise ConfigError(f'hash_key_env in {where} must name an environment variable, e.g. "{DEFAULT_HASH_KEY_ENV}"')
    hash_key: bytes | None = None
    if any(rule.hash for rule in rules.values()):
        secret = environ.get(key_env, "")
        if not secret:
            raise ConfigError(
                f"hashed columns need a secret key, and the environment variable {key_env} is not set: set it to a "
                f"random string of at least {MIN_HASH_KEY_BYTES} bytes (e.g. `openssl rand -hex 32`), the same one "
                "wherever hashes are computed to search"
            )
        hash_key = secret.encode()
        if len(hash_key) < MIN_HASH_KEY_BYTES:
            raise ConfigError(
                f"the hash key in {key_env} is {len(hash_key)} bytes, under {MIN_HASH_KEY_BYTES}: a short key makes "
                "hashes of guessable values easy to reverse; use e.g. `openssl rand -hex 32`"
            )
    return TrackingConfig(
        include=tuple(dict.fromkeys(includes)),
        exclude=tuple(dict.fromkeys(excludes)),
        tables=tuple(rules.items()),
        drop_noop_updates=drop_noop,
        hash_key=hash_key,
        mask_marker=marker,
        honor_skip=honor_skip,
    )


def _patterns(values: object, key: str, where: str) -> list[str]:
    if isinstance(values, str) or not isinstance(values, Iterable):
        raise ConfigError(f'{key} in {where} must be a list of table patterns, e.g. ["public.*"]')
    items = list(values)
    if not all(isinstance(item, str) for item in items):
        raise ConfigError(f'{key} in {where} must be a list of table patterns (strings), e.g. ["public.*"]')
    return [parse_table_pattern(item, where=f"{key} in {where}") for item in items]


def _bool(value: object, key: str, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} in {where} must be true or false, not {value!r}")
    return value


def _rules(value: object, where: str) -> ColumnRules:
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a table with the keys ignore, mask and hash (lists of column names)")
    unknown = sorted(set(value) - set(_RULE_KEYS))
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(unknown)} in {where}: the keys are ignore, mask and hash")
    found: dict[str, frozenset[str]] = {}
    for kind in _RULE_KEYS:
        names = value.get(kind, [])
        if isinstance(names, str) or not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            raise ConfigError(f'{kind} in {where} must be a list of column names, e.g. {kind} = ["email"]')
        found[kind] = frozenset(names)
    for first, second in (("ignore", "mask"), ("ignore", "hash"), ("mask", "hash")):
        both = found[first] & found[second]
        if both:
            raise ConfigError(
                f"column(s) {', '.join(sorted(both))} in {where} are both in {first} and {second}: choose one"
            )
    return ColumnRules(found["ignore"], found["mask"], found["hash"])

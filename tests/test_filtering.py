"""Table and column rules on decoded rows: pure functions, tested on pgoutput-shaped values."""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bemi_asgi import ConfigError, hash_value, skip_tracking
from bemi_asgi.capture.context import current
from bemi_asgi.worker.config import load_config
from bemi_asgi.worker.pgoutput import UNCHANGED, Column, Value
from bemi_asgi.worker.rules import Filters, Hasher, RowPolicy, filter_relation, hash_text, is_skip_context

KEY = "secret-key-0123456789"
COLUMNS = tuple(
    Column(True, name, oid, -1)
    for name, oid in [("id", 23), ("email", 25), ("password", 25), ("age", 23), ("updated_at", 1184), ("ok", 16)]
)


def filters(**options: Any) -> Filters:
    return Filters(load_config(environ={"BEMI_HASH_KEY": KEY}, **options))


def users_policy(**options: Any) -> RowPolicy:
    policy = filters(
        ignore_columns=["users.updated_at"],
        mask_columns=["users.password"],
        hash_columns=["users.email", "users.ok"],
        **options,
    ).policy("public", "users", COLUMNS, ["id"])
    assert policy is not None
    return policy


def row(**values: Value) -> tuple[Value, ...]:
    base: dict[str, Value] = {"id": "1", "email": "a@b.c", "password": "pw", "age": "30", "updated_at": "t1", "ok": "t"}
    base.update(values)
    return tuple(base[column.name] for column in COLUMNS)


def test_policy_cuts_ignored_masks_and_hashes() -> None:
    """Ignored columns leave the tuple, masked values become the marker, hashed ones their keyed HMAC in hex."""
    policy = users_policy()
    assert [column.name for column in policy.columns] == ["id", "email", "password", "age", "ok"]
    expected_email = hmac.new(KEY.encode(), b"a@b.c", hashlib.sha256).hexdigest()
    assert policy.row(row()) == ("1", expected_email, "[masked]", "30", hash_value(True, key=KEY))
    assert expected_email == hash_value("a@b.c", key=KEY)


def test_null_and_unchanged_values_pass_through_masking() -> None:
    """NULL stays NULL and an unchanged TOAST marker stays, for the worker to fill from the filtered old row."""
    assert users_policy().row(row(email=None, password=UNCHANGED))[1:3] == (None, UNCHANGED)


def test_update_of_only_ignored_columns_is_dropped_and_others_are_kept() -> None:
    """drops_update: true when only ignored columns differ; false when a masked or plain column changed; a no-op
    update is dropped only with drop_noop_updates."""
    policy = users_policy()
    assert policy.drops_update(row(), row(updated_at="t2")) is True
    assert policy.drops_update(row(), row(updated_at="t2", password="new")) is False  # masked, but changed
    assert policy.drops_update(row(), row(age="31")) is False
    assert policy.drops_update(row(), row(email=UNCHANGED)) is False  # a no-op: kept by default
    assert users_policy(drop_noop_updates=True).drops_update(row(), row()) is True


def test_tables_include_then_exclude() -> None:
    """A table is tracked when some include pattern matches (or there is none) and no exclude pattern does."""
    rules = filters(include=["public.*", "audit.log?"], exclude=["public.sessions"])
    assert rules.tracks("public", "users") is True
    assert rules.tracks("public", "sessions") is False
    assert rules.tracks("audit", "logs") is True
    assert rules.tracks("audit", "events") is False
    assert filters(exclude=["*.tmp_*"]).tracks("app", "tmp_x") is False
    assert filters().tracks("any", "thing") is True


def test_several_patterns_add_up_and_the_strictest_rule_wins() -> None:
    """Rules of every matching pattern add up; a column both masked and hashed by different patterns is masked."""
    rules = filters(hash_columns=["*.*.email"], mask_columns=["public.users.email"], ignore_columns=["*.*.age"])
    policy = rules.policy("public", "users", COLUMNS, ["id"])
    assert policy is not None
    assert [column.name for column in policy.columns] == ["id", "email", "password", "updated_at", "ok"]
    assert policy.row(row())[1] == "[masked]"
    assert rules.policy("other", "t", COLUMNS, ["id"]).row(row())[1] == hash_value("a@b.c", key=KEY)  # type: ignore[union-attr]


def test_no_rules_means_no_policy() -> None:
    """A table no column rule names gets no policy (the worker's row path is untouched) unless no-ops are dropped."""
    assert filters(mask_columns=["users.password"]).policy("public", "orders", COLUMNS, ["id"]) is None
    assert filters(drop_noop_updates=True).policy("public", "orders", COLUMNS, ["id"]) is not None


def test_ignored_or_masked_key_column_is_refused() -> None:
    """Ignoring or masking a primary key column is a ConfigError; hashing one is allowed."""
    with pytest.raises(ConfigError, match=r"public\.users\.id is ignored, but it is part of the primary key"):
        filters(ignore_columns=["users.id"]).policy("public", "users", COLUMNS, ["id"])
    with pytest.raises(ConfigError, match="is masked"):
        filters(mask_columns=["users.id"]).policy("public", "users", COLUMNS, ["id"])
    assert filters(hash_columns=["users.id"]).policy("public", "users", COLUMNS, ["id"]) is not None


def test_problems_name_unknown_columns_of_exact_patterns_only() -> None:
    """A rule of an exact table naming a missing column is a problem; a wildcard pattern's rule is not."""
    rules = filters(mask_columns=["users.pasword", "*.*.token"])
    assert rules.problems("public", "users", [c.name for c in COLUMNS], ["id"]) == [
        "public.users has no column pasword (in its mask rule): fix the name, or remove it from the rule"
    ]


@dataclass
class Rel:
    schema: str
    table: str
    columns: tuple[Column, ...]
    converters: tuple[Any, ...]
    key: tuple[int, ...]
    replica_key: tuple[int, ...]
    ignored: bool = False
    policy: RowPolicy | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def test_filter_relation_remaps_columns_converters_and_key_positions() -> None:
    """After filtering, the relation's columns, converters and key positions describe the filtered tuple, and
    masked or hashed columns are stored as text whatever their type."""
    columns = (Column(True, "updated_at", 1184, -1), *COLUMNS[:4])  # updated_at first: positions shift
    rel = Rel("public", "users", columns, (str, int, str, str, int), (1,), (1, 4))
    filter_relation(filters(ignore_columns=["users.updated_at"], hash_columns=["users.age"]), rel)
    assert [column.name for column in rel.columns] == ["id", "email", "password", "age"]
    assert (rel.key, rel.replica_key) == ((0,), (0, 3))
    assert rel.converters[0] is int
    assert rel.converters[3]("abc") == "abc"  # hashed int column: its converter keeps the text
    excluded = Rel("public", "sessions", COLUMNS, (), (0,), (0,))
    filter_relation(filters(exclude=["public.sessions"]), excluded)
    assert excluded.ignored is True


def test_skip_tracking_sets_the_reserved_key_the_worker_recognizes() -> None:
    """skip_tracking() merges `_bemi_skip: true` over the current context, and is_skip_context recognizes exactly
    that (not a string, not a nested key, not another message)."""
    with skip_tracking():
        data = current()
    assert data is not None
    assert json.loads(data.json) == {"_bemi_skip": True}
    assert is_skip_context(data.json.encode(), data.json) is True
    for text in ('{"_bemi_skip": "true"}', '{"a": {"_bemi_skip": true}}', '{"user": 1}', '{"_bemi_skip": false}'):
        assert is_skip_context(text.encode(), text) is False


@given(st.text(max_size=50))
def test_hash_value_matches_hmac_of_the_utf8_text(text: str) -> None:
    """hash_value(text) is the hex HMAC-SHA256 of its UTF-8 bytes under the key, for any text."""
    try:
        expected = hmac.new(KEY.encode(), text.encode(), hashlib.sha256).hexdigest()
    except UnicodeEncodeError:
        return
    assert hash_value(text, key=KEY) == expected


def test_hash_value_reads_the_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without key=, BEMI_HASH_KEY is the key; with neither, a ConfigError says what to set."""
    monkeypatch.setenv("BEMI_HASH_KEY", KEY)
    assert hash_value(42) == hash_value("42", key=KEY)
    monkeypatch.delenv("BEMI_HASH_KEY")
    with pytest.raises(ConfigError, match="BEMI_HASH_KEY"):
        hash_value("x")


def test_the_hash_key_never_appears_in_a_repr() -> None:
    """A row policy that hashes holds the key: neither its repr nor its filters' shows it."""
    key = "K" * 20 + "-unique-key-text"
    config = load_config(hash_columns=["users.email"], environ={"BEMI_HASH_KEY": key})
    policy = Filters(config).policy("public", "users", COLUMNS, ["id"])
    assert policy is not None
    for text in (repr(policy), repr(config), repr(Filters(config)), str(policy.transforms)):
        assert key not in text
        assert key.encode().hex() not in text
        assert "KKKK" not in text


@given(st.binary(min_size=1, max_size=200), st.text())
def test_the_workers_hasher_is_hmac_sha256(key: bytes, text: str) -> None:
    """The worker's hasher (inner and outer states computed once) gives the standard library's HMAC-SHA256, for
    keys shorter and longer than SHA-256's block and any text."""
    assert Hasher(key)(text) == hash_text(key, text) == hmac.new(key, text.encode(), hashlib.sha256).hexdigest()

"""Loading the tracking configuration: the TOML file, the command line options, and every refusal."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bemi_asgi import ConfigError
from bemi_asgi.worker.config import ColumnRules, load_config, parse_column_option, parse_table_pattern

KEY = {"BEMI_HASH_KEY": "0123456789abcdef0123"}

EXAMPLE = """
include = ["public.*", "billing.invoices"]
exclude = ["public.sessions"]
drop_noop_updates = true
mask_marker = "***"

[tables."public.users"]
ignore = ["updated_at"]
mask = ["password_hash"]
hash = ["email"]

[tables."*.*"]
ignore = ["lock_version"]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bemi.toml"
    path.write_text(text)
    return path


def test_example_file_loads_into_the_configuration(tmp_path: Path) -> None:
    """Every key of the documented example ends up in the configuration, with the hash key from the environment."""
    config = load_config(write(tmp_path, EXAMPLE), environ=KEY)
    assert config.include == ("public.*", "billing.invoices")
    assert config.exclude == ("public.sessions",)
    assert config.drop_noop_updates is True
    assert config.mask_marker == "***"
    assert config.honor_skip is True
    assert dict(config.tables) == {
        "public.users": ColumnRules(frozenset({"updated_at"}), frozenset({"password_hash"}), frozenset({"email"})),
        "*.*": ColumnRules(ignore=frozenset({"lock_version"})),
    }
    assert config.hash_key == KEY["BEMI_HASH_KEY"].encode()
    assert "0123456789" not in repr(config)  # the key is never printed


def test_options_add_to_the_file(tmp_path: Path) -> None:
    """Command line options add patterns and column rules to the file's, and --drop-noop-updates turns it on."""
    config = load_config(
        write(tmp_path, '[tables."public.users"]\nmask = ["password"]\n'),
        include=["app.*"],
        exclude=["app.tmp_*"],
        ignore_columns=["users.updated_at"],
        hash_columns=["public.users.email"],
        drop_noop_updates=True,
        environ=KEY,
    )
    assert (config.include, config.exclude, config.drop_noop_updates) == (("app.*",), ("app.tmp_*",), True)
    assert dict(config.tables)["public.users"] == ColumnRules(
        frozenset({"updated_at"}), frozenset({"password"}), frozenset({"email"})
    )


def test_nothing_configured_filters_nothing() -> None:
    """Without a file or options the configuration has no rules, so the worker's row path is left alone."""
    config = load_config(environ={})
    assert config.filters_rows is False
    assert load_config(include=["public.*"], environ={}).filters_rows is True


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("includes = []", "unknown key(s) includes"),
        ('[tables."public.users"]\nmasked = ["a"]', "unknown key(s) masked"),
        ('[tables."public.users"]\nmask = "a"', "must be a list of column names"),
        ('[tables."public.users"]\nmask = ["a"]\nhash = ["a"]', "both in mask and hash"),
        ('include = "public.*"', "must be a list of table patterns"),
        ('exclude = [".users"]', "is not a table pattern"),
        ("drop_noop_updates = 1", "must be true or false"),
        ("honor_skip = 'no'", "must be true or false"),
        ("mask_marker = 1", "must be a string"),
        ("include = [", "is not valid TOML"),
    ],
)
def test_invalid_files_are_refused_with_what_to_fix(tmp_path: Path, text: str, message: str) -> None:
    """A wrong key, type or value is a ConfigError naming it and the file."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        load_config(path, environ=KEY)
    assert str(path) in str(error.value)


def test_hashing_needs_a_long_enough_key(tmp_path: Path) -> None:
    """A hash rule without the key in the environment, or with a short key, is refused; hash_key_env renames it."""
    with pytest.raises(ConfigError, match="BEMI_HASH_KEY is not set"):
        load_config(hash_columns=["users.email"], environ={})
    with pytest.raises(ConfigError, match="under 16"):
        load_config(hash_columns=["users.email"], environ={"BEMI_HASH_KEY": "short"})
    path = write(tmp_path, 'hash_key_env = "AUDIT_KEY"\n[tables.users]\nhash = ["email"]\n')
    assert load_config(path, environ={"AUDIT_KEY": "x" * 16}).hash_key == b"x" * 16
    assert load_config(mask_columns=["users.email"], environ={}).hash_key is None  # only read when hashing


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    """A --config path that does not exist says so."""
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_patterns_and_column_options_parse() -> None:
    """A pattern without a schema is in public; a column option splits at its last dot; malformed ones fail."""
    assert parse_table_pattern("users", where="x") == "public.users"
    assert parse_table_pattern("audit.*", where="x") == "audit.*"
    assert parse_column_option("users.email", where="x") == ("public.users", "email")
    assert parse_column_option("*.*.updated_at", where="x") == ("*.*", "updated_at")
    for bad in ("email", "users.", ".email"):
        with pytest.raises(ConfigError, match="is not a column"):
            parse_column_option(bad, where="--mask-column")

"""Capture real pgoutput messages for the decoder tests; rerun it to regenerate the files next to it.

    python -m tests.data.pgoutput.capture            # a throwaway local server (see bemi_asgi.ops.postgres)
    python -m tests.data.pgoutput.capture --dsn URL  # an existing database (superuser, wal_level=logical)

`run_scenario` creates a few tables, a publication and a pgoutput slot, runs one transaction per case below, and
returns every message `pg_logical_slot_peek_binary_changes(..., 'proto_version', '1', 'messages', 'true')` gives,
with facts the tests compare against (OIDs, the server's own text of the inserted row, clock bounds). The slot is
dropped afterwards. `main` writes one `NN_kind.bin` file per message and `manifest.json` (the facts, and each
file's `lsn` and `xid` columns from the peek). The live tests call `run_scenario` on the test server directly.

The cases, in order:
    insert             a row of items (enum column: a Type message first) and a transactional `_bemi` message
    update_toast       a non-key column of that row: the large TOASTed `big` arrives as 'u' (unchanged)
    update_key         its primary key (REPLICA IDENTITY DEFAULT): a 'K' old tuple, only the key set
    delete_key         the row: a 'K' old tuple
    full_insert        a row of accounts (REPLICA IDENTITY FULL): every column flagged as key in Relation
    full_update        a non-key column of it: an 'O' old tuple with the whole old row, 'u' for `big` in the new
    full_delete        the row: an 'O' old tuple
    message            a non-transactional logical message with binary content (no Begin/Commit around it)
    origin             a transaction replayed under a replication origin: an Origin message after Begin
    truncate_cascade   TRUNCATE parents RESTART IDENTITY CASCADE (children follow)
    truncate_plain     TRUNCATE items
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

HERE = Path(__file__).parent
SLOT = "bemi_capture"
PUBLICATION = "bemi_capture"

# The values written, as SQL literals and as the text the tests expect back.
NAME = 'café "quoted" \\ back\tslash'
PRICE = "12345678901234567890.000000001"
CODE = "ü-42"
TAGS = '{plain,"with space","quo\\"te",NULL}'
CONTEXT = '{"user": "zoë", "path": "/items"}'
ORIGIN_NAME = "upstream"
ORIGIN_LSN = "0/12345678"
MESSAGE_CONTENT = b"\x00\xffbinary\x00"
EMAIL_BEFORE = "a@example.com"
EMAIL_AFTER = "b@example.com"


def big_text(length: int = 6000) -> str:
    """A deterministic, incompressible-looking text, long enough to be stored out of line (TOAST)."""
    out = []
    digest = b"bemi"
    while sum(map(len, out)) < length:
        digest = hashlib.sha256(digest).digest()
        out.append(digest.hex())
    return "".join(out)[:length]


BIG = big_text()

SETUP = """
CREATE TYPE mood AS ENUM ('happy', 'sad');
CREATE TABLE items (id int PRIMARY KEY, name text, price numeric, code varchar(20), mood mood, big text, tags text[]);
ALTER TABLE items ALTER COLUMN big SET STORAGE EXTERNAL;
CREATE TABLE accounts (id bigint PRIMARY KEY, email text, big text);
ALTER TABLE accounts ALTER COLUMN big SET STORAGE EXTERNAL;
ALTER TABLE accounts REPLICA IDENTITY FULL;
CREATE TABLE parents (id serial PRIMARY KEY, label text);
CREATE TABLE children (id serial PRIMARY KEY, parent_id int REFERENCES parents);
CREATE PUBLICATION bemi_capture FOR TABLE items, accounts, parents, children;
"""


@dataclass
class Capture:
    """What the server sent: (lsn text, xid, message bytes) per peeked row, and facts about the scenario."""

    rows: list[tuple[str, int, bytes]]
    facts: dict[str, Any]


def run_scenario(dsn: str) -> Capture:
    """Run every case on the (empty) database at `dsn`; return the peeked messages. Drops the slot afterwards."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SETUP)
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", [SLOT])
        try:
            facts = _run_cases(conn)
            rows = conn.execute(
                "SELECT lsn::text, xid::text::bigint, data FROM pg_logical_slot_peek_binary_changes("
                "%s, NULL, NULL, 'proto_version', '1', 'publication_names', %s, 'messages', 'true')",
                [SLOT, PUBLICATION],
            ).fetchall()
        finally:
            conn.execute("SELECT pg_drop_replication_slot(%s)", [SLOT])
    return Capture([(lsn, xid, bytes(data)) for lsn, xid, data in rows], facts)


def _run_cases(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    def one(sql: str) -> Any:
        row = conn.execute(sql).fetchone()
        assert row is not None
        return row[0]

    facts: dict[str, Any] = {
        "server_version": conn.info.server_version // 10000,
        "oids": {name: one(f"SELECT '{name}'::regclass::oid") for name in ["items", "accounts", "parents", "children"]},
        "mood_oid": one("SELECT 'mood'::regtype::oid"),
        "started_at": one("SELECT clock_timestamp()::text"),
    }
    with conn.transaction():  # insert
        conn.execute(
            "INSERT INTO items VALUES (1, %s, %s::numeric, %s, 'happy', %s, %s::text[])", [NAME, PRICE, CODE, BIG, TAGS]
        )
        conn.execute("SELECT pg_logical_emit_message(true, '_bemi', %s)", [CONTEXT])
        # The server's own text of the row: what pgoutput must carry, value for value.
        row = conn.execute(
            "SELECT id::text, name, price::text, code::text, mood::text, big, tags::text FROM items WHERE id = 1"
        ).fetchone()
        facts["item_text"] = list(row or ())
    with conn.transaction():  # update_toast
        conn.execute("UPDATE items SET name = 'renamed' WHERE id = 1")
    with conn.transaction():  # update_key
        conn.execute("UPDATE items SET id = 2 WHERE id = 1")
    with conn.transaction():  # delete_key
        conn.execute("DELETE FROM items WHERE id = 2")
    with conn.transaction():  # full_insert
        conn.execute("INSERT INTO accounts VALUES (7, %s, %s)", [EMAIL_BEFORE, BIG])
    with conn.transaction():  # full_update
        conn.execute("UPDATE accounts SET email = %s WHERE id = 7", [EMAIL_AFTER])
    with conn.transaction():  # full_delete
        conn.execute("DELETE FROM accounts WHERE id = 7")
    conn.execute("SELECT pg_logical_emit_message(false, 'other', %s::bytea)", [MESSAGE_CONTENT])  # message
    conn.execute("SELECT pg_replication_origin_create(%s)", [ORIGIN_NAME])  # origin
    conn.execute("SELECT pg_replication_origin_session_setup(%s)", [ORIGIN_NAME])
    try:
        with conn.transaction():
            conn.execute("SELECT pg_replication_origin_xact_setup(%s, now())", [ORIGIN_LSN])
            conn.execute("INSERT INTO parents (label) VALUES ('p')")
            conn.execute("INSERT INTO children (parent_id) VALUES (1)")
    finally:
        conn.execute("SELECT pg_replication_origin_session_reset()")
        conn.execute("SELECT pg_replication_origin_drop(%s)", [ORIGIN_NAME])
    conn.execute("TRUNCATE parents RESTART IDENTITY CASCADE")  # truncate_cascade
    conn.execute("TRUNCATE items")  # truncate_plain
    facts["finished_at"] = one("SELECT clock_timestamp()::text")
    return facts


_KINDS = {
    "B": "begin", "C": "commit", "O": "origin", "R": "relation", "Y": "type", "I": "insert", "U": "update",
    "D": "delete", "T": "truncate", "M": "message",
}  # fmt: skip


def write(capture: Capture, directory: Path) -> None:
    """Replace the .bin files and manifest.json in `directory` with `capture`."""
    for old in directory.glob("*.bin"):
        old.unlink()
    entries = []
    for index, (lsn, xid, data) in enumerate(capture.rows):
        name = f"{index:02d}_{_KINDS.get(chr(data[0]), 'unknown')}.bin"
        (directory / name).write_bytes(data)
        entries.append({"file": name, "lsn": lsn, "xid": xid})
    manifest = {"facts": capture.facts, "messages": entries}
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")


def load(directory: Path = HERE) -> Capture:
    """Read back what `write` stored."""
    manifest = json.loads((directory / "manifest.json").read_text())
    rows = [(m["lsn"], m["xid"], (directory / m["file"]).read_bytes()) for m in manifest["messages"]]
    return Capture(rows, manifest["facts"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", help="an existing empty database (default: start a throwaway local server)")
    parser.add_argument("--out", type=Path, default=HERE, help="where to write the files (default: next to this)")
    args = parser.parse_args()
    if args.dsn:
        capture = run_scenario(args.dsn)
    else:
        from bemi_asgi.ops.postgres import LocalPostgres

        base = Path(tempfile.mkdtemp(prefix="bemi-asgi-capture-"))
        base.chmod(0o755)  # the server may run as another user
        try:
            with LocalPostgres(base / "data") as server:
                capture = run_scenario(server.dsn())
        finally:
            shutil.rmtree(base, ignore_errors=True)
    write(capture, args.out)
    print(f"wrote {len(capture.rows)} messages to {args.out}")


if __name__ == "__main__":
    main()

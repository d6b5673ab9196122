"""Tamper evidence: the worker and the backfill chain what they store; `bemi-asgi verify` finds and locates a change
edited, deleted, inserted or moved directly in `bemi.changes`, and an intact history verifies, also after the
worker was killed and restarted and after `prune` cut it."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import signal
import sys
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from typer.testing import CliRunner

from bemi_asgi._exceptions import DestinationNotReadyError
from bemi_asgi.cli import app
from bemi_asgi.ops import verify as verify_module
from bemi_asgi.ops.migration import migration_sql
from bemi_asgi.ops.prune import prune
from bemi_asgi.ops.verify import ChainReport, verify
from bemi_asgi.worker import chain
from bemi_asgi.worker.backfill import Backfill
from bemi_asgi.worker.chain import chain_hasher

from .worker_support import changes, drain, emit

KEY = b"a chain key the database never sees"


def migrate(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id int PRIMARY KEY, name text, price numeric, tags jsonb)")
        conn.execute(migration_sql())
        conn.execute("SELECT pg_create_logical_replication_slot('bemi', 'pgoutput')")


def write(dsn: str, transactions: int, start: int = 0) -> None:
    """`transactions` transactions of a few row changes each, with a context."""
    with psycopg.connect(dsn) as conn:
        for n in range(start, start + transactions):
            conn.execute("INSERT INTO items VALUES (%s, %s, 1.50, %s)", [n, f"item {n}", '{"b": 1, "a": [1.0, 2]}'])
            conn.execute("UPDATE items SET name = name || '!' WHERE id = %s", [n])
            emit(conn, {"user": "alice", "n": n})
            conn.commit()


def changes_report(dsn: str, key: bytes | None = KEY, **options: Any) -> ChainReport:
    return verify(dsn, key=key, **options)[0]


@pytest.fixture
def history(database: str) -> str:
    """A database with 30 chained changes (keyed), stored in several worker batches."""
    migrate(database)
    write(database, 5)
    return database


async def stored_history(dsn: str) -> None:
    await drain(dsn, chain_key=KEY)
    write(dsn, 10, start=5)
    await drain(dsn, chain_key=KEY, batch_rows=4)


def as_superuser(dsn: str, statement: str, params: list[Any] | None = None) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(statement, params)


#: A copy of change {id} at its ordinal + 100, with another context: a change the chain does not cover.
COPY_AT_ANOTHER_ORDINAL = (
    'INSERT INTO bemi.changes (primary_key, "before", "after", context, database, "schema", "table", operation,'
    " committed_at, queued_at, transaction_id, position, commit_lsn, ordinal, stream)"
    ' SELECT primary_key, "before", "after", \'{"user": "mallory"}\', database, "schema", "table", operation,'
    " committed_at, queued_at, transaction_id, position, commit_lsn, ordinal + 100, stream"
    " FROM bemi.changes WHERE id = {id}"
)


def stamp_every_stored_change(dsn: str) -> None:
    """A trigger on bemi.changes adding to every context: the destination stores something else than was sent."""
    as_superuser(
        dsn,
        "CREATE FUNCTION public.stamp() RETURNS trigger LANGUAGE plpgsql AS $$"
        " BEGIN NEW.context := NEW.context || '{\"stamped\": true}'; RETURN NEW; END $$;"
        " CREATE TRIGGER stamp BEFORE INSERT ON bemi.changes FOR EACH ROW EXECUTE FUNCTION public.stamp()",
    )


def assert_first_problem(dsn: str, kind: str, commit_lsn: int, ordinal: int) -> None:
    problem = changes_report(dsn).problem
    assert problem is not None
    assert (problem.kind, problem.commit_lsn, problem.ordinal) == (kind, commit_lsn, ordinal)


def assert_intact_then_an_edit_is_found(dsn: str, stored: int, victim: int) -> None:
    """The history verifies, with `stored` changes; then the change at index `victim`, edited by a superuser, is
    found where it is."""
    report = changes_report(dsn)
    assert report.intact, report.describe()
    assert report.changes == stored
    change = changes(dsn)[victim]
    as_superuser(dsn, "UPDATE bemi.changes SET context = '{}' WHERE id = %s", [change["id"]])
    assert_first_problem(dsn, "edited", change["commit_lsn"], change["ordinal"])


async def test_an_intact_history_verifies_with_its_head_and_position(history: str) -> None:
    """Every stored change is covered; verify says intact, with the head's hash and position, and the same head is
    found again later at the same position."""
    await stored_history(history)
    stored = changes(history)
    report = changes_report(history)
    assert report.intact, report.describe()
    assert report.changes == len(stored) == 30
    assert report.position == (stored[-1]["commit_lsn"], stored[-1]["ordinal"])
    assert report.links > 2  # several batches, chained to each other
    head = report.head

    write(history, 3, start=50)
    await drain(history, chain_key=KEY)
    later = changes_report(history, up_to=stored[-1]["commit_lsn"])
    assert later.intact
    assert (later.position, later.head) == (report.position, head)
    assert changes_report(history).head != head


@pytest.mark.parametrize(
    ("tampering", "found"),
    [
        ('UPDATE bemi.changes SET context = \'{"user": "mallory"}\' WHERE id = {id}', "edited"),
        ('UPDATE bemi.changes SET "after" = "after" || \'{"price": "0.01"}\' WHERE id = {id}', "edited"),
        ("UPDATE bemi.changes SET committed_at = committed_at - interval '1 day' WHERE id = {id}", "edited"),
        ("DELETE FROM bemi.changes WHERE id = {id}", "deleted"),
        (COPY_AT_ANOTHER_ORDINAL, "inserted"),
        # Two changes swap places: each is intact, in the wrong position.
        (
            "UPDATE bemi.changes SET ordinal = 1000 WHERE id = {id};"
            " UPDATE bemi.changes SET ordinal = 1 WHERE ordinal = 2"
            "  AND commit_lsn = (SELECT commit_lsn FROM bemi.changes WHERE id = {id});"
            " UPDATE bemi.changes SET ordinal = 2 WHERE id = {id}",
            "edited",
        ),
    ],
)
async def test_a_superusers_edit_is_found_and_located(history: str, tampering: str, found: str) -> None:
    """An UPDATE, DELETE or INSERT made directly on bemi.changes is reported, with the change it is at, and what
    comes before it still verifies."""
    await stored_history(history)
    stored = changes(history)
    victim = stored[12]
    as_superuser(history, tampering.replace("{id}", str(victim["id"])))

    report = changes_report(history)
    assert report.problem is not None, report.describe()
    assert report.problem.kind == found
    if found == "inserted":
        assert (report.problem.commit_lsn, report.problem.ordinal) == (victim["commit_lsn"], victim["ordinal"] + 100)
    else:
        assert (report.problem.commit_lsn, report.problem.ordinal) == (victim["commit_lsn"], 1 if "1000" in tampering
                                                                       else victim["ordinal"])  # fmt: skip
    # What comes before it verified: the report stands at the last stored change before the problem.
    problem_key = (report.problem.commit_lsn, report.problem.ordinal)
    assert report.position == max((row["commit_lsn"], row["ordinal"]) for row in stored
                                  if (row["commit_lsn"], row["ordinal"]) < problem_key)  # fmt: skip
    assert "NOT INTACT" in report.describe()


async def test_a_recomputed_chain_needs_the_key(history: str) -> None:
    """Verifying with another key (or none) says the links were written with another key, rather than calling a
    change edited; an unkeyed chain verifies without a key."""
    await stored_history(history)
    other = changes_report(history, key=b"another key of enough bytes")
    assert other.problem is not None
    assert other.problem.kind == "key"
    assert changes_report(history, key=None).problem is not None


async def test_unkeyed_chain_verifies_and_shows_an_edit(database: str) -> None:
    """Without BEMI_CHAIN_KEY the chain is plain SHA-256: it verifies, and an edit is still found."""
    migrate(database)
    write(database, 4)
    await drain(database)
    assert changes_report(database, key=None).intact
    as_superuser(database, 'UPDATE bemi.changes SET "before" = \'{"x": 1}\' WHERE ordinal = 2')
    report = changes_report(database, key=None)
    assert report.problem is not None
    assert report.problem.kind == "edited"


async def test_a_destination_that_rewrites_rows_gets_the_digests_it_stored(
    database: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The worker computes each digest from the row as it sent it, and checks each table's first batch against the
    destination's own: when the destination stores something else (here a trigger adding to every context), the
    worker says so and chains the destination's digests from then on, so the history still verifies."""
    migrate(database)
    stamp_every_stored_change(database)
    write(database, 3)
    with caplog.at_level(logging.WARNING, logger="bemi_asgi.worker"):
        await drain(database, chain_key=KEY, batch_rows=2)
    assert len([r for r in caplog.records if "digest" in r.message]) == 1
    assert all(row["context"]["stamped"] for row in changes(database))
    report = changes_report(database)
    assert report.intact, report.describe()
    assert report.changes == 6


async def test_contents_are_read_back_and_verified_a_page_at_a_time(
    database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The destination's contents, read back for the chain (here because a trigger rewrites rows) and by verify,
    come a page at a time: with pages of 3 changes the history still chains and verifies whole, and a change
    inserted among them is found where it is."""
    monkeypatch.setattr(chain, "READ_BACK_CHANGES", 3)
    monkeypatch.setattr(verify_module, "READ_BACK_CHANGES", 3)
    migrate(database)
    stamp_every_stored_change(database)
    write(database, 5)
    await drain(database, chain_key=KEY)
    report = changes_report(database)
    assert report.intact, report.describe()
    assert (report.changes, report.links) == (10, 1)

    victim = changes(database)[4]
    as_superuser(database, COPY_AT_ANOTHER_ORDINAL.replace("{id}", str(victim["id"])))
    assert_first_problem(database, "inserted", victim["commit_lsn"], victim["ordinal"] + 100)


async def test_a_destination_with_other_column_types_is_chained_as_the_migrations_types(history: str) -> None:
    """A `bemi.changes` whose column types differ from the migration's (ordinal widened to bigint) is written by
    records, and its rows are read back for the chain: their contents are printed as the migration's types would
    be sent, so the history chains, verifies, and an edit is still found."""
    as_superuser(history, "ALTER TABLE bemi.changes ALTER COLUMN ordinal TYPE bigint")
    await drain(history, chain_key=KEY)
    assert_intact_then_an_edit_is_found(history, stored=10, victim=6)


async def test_a_large_batch_is_linked_in_bounded_rows(database: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch of more changes than one `bemi.chain` row holds is linked in several rows, chained to each other in
    the same transaction; it verifies, and an edit in a later row is still located."""
    monkeypatch.setattr(chain, "LINK_CHANGES", 4)
    migrate(database)
    write(database, 15)
    await drain(database, chain_key=KEY)
    report = changes_report(database)
    assert report.intact, report.describe()
    assert (report.changes, report.links) == (30, 8)
    target = changes(database)[21]
    as_superuser(
        database,
        "UPDATE bemi.changes SET context = '{}' WHERE commit_lsn = %s AND ordinal = %s",
        [target["commit_lsn"], target["ordinal"]],
    )
    assert_first_problem(database, "edited", target["commit_lsn"], target["ordinal"])


async def test_history_verifies_after_the_worker_is_killed_and_restarted(database: str, tmp_path: Any) -> None:
    """The worker killed with SIGKILL while it stores (and started again, several times) leaves a history that is
    stored once and verifies: a batch and its link commit together."""
    migrate(database)
    env = {**os.environ, "BEMI_CHAIN_KEY": KEY.decode(), "BEMI_SOURCE_URL": database}
    command = [sys.executable, "-m", "bemi_asgi", "worker", "--quiet"]
    for round_number in range(3):
        write(database, 40, start=round_number * 1000)
        worker = await asyncio.create_subprocess_exec(
            *command, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )
        try:
            # Kill it once it has stored something of this round (the batches are small and many), or after 30 s.
            for _ in range(1500):
                if len(changes(database)) > round_number * 80:
                    break
                await asyncio.sleep(0.02)
        finally:
            worker.send_signal(signal.SIGKILL)
            await worker.wait()
    await drain(database, chain_key=KEY, batch_rows=7)
    stored = changes(database)
    assert len(stored) == 3 * 80
    assert len({(row["commit_lsn"], row["ordinal"]) for row in stored}) == len(stored)
    report = changes_report(database)
    assert report.intact, report.describe()
    assert report.changes == len(stored)


async def test_baselines_have_their_own_chain(database: str) -> None:
    """Baselines a backfill stores (in its own transactions, while the worker runs) are chained apart, in the
    order stored; a baseline edited later is found in that chain, and the worker's chain stays intact."""
    migrate(database)
    write(database, 3)
    await drain(database, chain_key=KEY)
    await Backfill(database, batch_rows=2, chain_key=KEY).run()
    write(database, 2, start=10)
    await drain(database, chain_key=KEY)

    worker_chain, baselines = verify(database, key=KEY)
    assert worker_chain.intact
    assert baselines.intact, baselines.describe()
    assert baselines.changes == 3
    assert baselines.links == 2
    as_superuser(database, "UPDATE bemi.changes SET \"after\" = '{}' WHERE operation = 'SNAPSHOT' AND ordinal = "
                 "(SELECT max(ordinal) FROM bemi.changes WHERE operation = 'SNAPSHOT')")  # fmt: skip
    worker_chain, baselines = verify(database, key=KEY)
    assert worker_chain.intact
    assert baselines.problem is not None
    assert baselines.problem.kind == "edited"


async def test_prune_leaves_an_anchor_that_verifies(history: str) -> None:
    """After prune cut the oldest changes, the rest verifies from the anchor prune left; deleting one more change
    by hand is still found."""
    await stored_history(history)
    stored = changes(history)
    cutoff = stored[14]["committed_at"]
    assert prune(history, before=cutoff).deleted == len([row for row in stored if row["committed_at"] < cutoff])
    report = changes_report(history)
    assert report.intact, report.describe()
    assert report.anchor is not None
    assert report.position == (stored[-1]["commit_lsn"], stored[-1]["ordinal"])
    assert report.changes == len(changes(history))
    with psycopg.connect(history, autocommit=True) as conn:
        remaining = conn.execute("SELECT count(*) FROM bemi.chain").fetchone()
    assert remaining is not None
    assert remaining[0] < report.links + 2  # the links wholly before the cut are gone

    prune(history, before=datetime.now(UTC))  # everything
    assert changes_report(history).intact
    write(history, 2, start=100)
    await drain(history, chain_key=KEY)
    report = changes_report(history)
    assert report.intact, report.describe()
    assert report.changes == 4


def test_verify_command_prints_the_head_and_exits_1_on_tampering(database: str) -> None:
    """`bemi-asgi verify` prints each chain's state; it exits 0 when intact (and when the published head matches
    at its position), 1 when a change was edited, naming it."""
    migrate(database)
    write(database, 3)
    asyncio.run(drain(database, chain_key=KEY))
    runner = CliRunner()
    env = {"BEMI_CHAIN_KEY": KEY.decode()}
    result = runner.invoke(app, ["verify", database, "--quiet"], env=env)
    assert result.exit_code == 0, result.output
    assert "changes of stream 1 (database test_" in result.stdout
    assert ", slot bemi): intact, 6 changes" in result.stdout
    head = result.stdout.split("head ")[1].split()[0]
    last = changes(database)[-1]["commit_lsn"]
    lsn = f"{last >> 32:X}/{last & 0xFFFFFFFF:X}"
    published = ["verify", database, "-q", "--stream", "1", "--up-to", lsn]
    assert runner.invoke(app, [*published, "--expect", head], env=env).exit_code == 0
    assert runner.invoke(app, [*published, "--expect", "00" * 32], env=env).exit_code == 1
    # A head names one stream: --expect without --stream is a usage error, not a verdict.
    assert runner.invoke(app, ["verify", database, "-q", "--expect", head], env=env).exit_code == 2
    as_superuser(database, "UPDATE bemi.changes SET context = '{}' WHERE ordinal = 1")
    result = runner.invoke(app, ["verify", database, "--quiet"], env=env)
    assert result.exit_code == 1
    assert "NOT INTACT, edited" in result.stdout


@pytest.mark.parametrize("key_bytes", [None, 16, 64, 65, 200])
def test_chain_hash_is_hmac_sha256_of_the_previous_hash_and_the_content(key_bytes: int | None) -> None:
    """The chain hash is HMAC-SHA256 (RFC 2104, keys longer than a block hashed first) over the previous hash and
    the change's content (formats 2 and 3, which differ in what the content is), SHA-256 of the same without a key;
    format 1 (links written before format 2) hashed the previous hash, the commit LSN and ordinal (big-endian int8,
    int4) and the content's digest. The worker's own loop (`Link.add`) gives the same hashes as `chain_hasher`."""
    key = None if key_bytes is None else bytes(range(256))[:key_bytes]

    def expected(message: bytes) -> bytes:
        return hashlib.sha256(message).digest() if key is None else hmac.digest(key, message, "sha256")

    previous, content, digest = bytes(range(32)), b'["a change", 7]', bytes(range(100, 132))
    assert chain_hasher(key)(previous, 2**40 + 5, 7, content) == expected(previous + content)
    position = (2**40 + 5).to_bytes(8, "big") + (7).to_bytes(4, "big")
    assert chain_hasher(key, 1)(previous, 2**40 + 5, 7, digest) == expected(previous + position + digest)

    contents = [b"[%d]" % n for n in range(5)]
    pending = chain.Link(chain.ChainState(1, "changes", key, head=previous))
    pending.add(2**40 + 5, [1, 2, 3, 4, 5], contents)
    hashes, head = [], previous
    for ordinal, one in enumerate(contents, start=1):
        head = chain_hasher(key)(head, 2**40 + 5, ordinal, one)
        hashes.append(head)
    assert (bytes(pending.hashes), pending.head) == (b"".join(hashes), head)
    assert (list(pending.lsns), list(pending.ordinals)) == ([2**40 + 5] * 5, [1, 2, 3, 4, 5])


def as_format(dsn: str, key: bytes, chain_format: int) -> None:
    """Rewrite every link of the stream's chain of changes as links of an earlier `chain_format` are written: what
    a destination holds after a worker of an earlier version stored them."""
    hasher, covered = chain_hasher(key, chain_format), chain.covered_sql(chain_format)
    with psycopg.connect(dsn) as conn:
        previous = chain.GENESIS
        links = conn.execute("SELECT seq, commit_lsns, ordinals FROM bemi.chain WHERE kind = 'changes' ORDER BY seq")
        for seq, lsns, ordinals in links.fetchall():
            hashes = b""
            for lsn, ordinal in zip(lsns, ordinals, strict=True):
                row = conn.execute(
                    f"SELECT {covered} FROM bemi.changes WHERE commit_lsn = %s AND ordinal = %s", [lsn, ordinal]
                ).fetchone()
                assert row is not None
                hashes += hasher(previous if not hashes else hashes[-32:], lsn, ordinal, bytes(row[0]))
            conn.execute(
                "UPDATE bemi.chain SET format = %s, previous = %s, hashes = %s WHERE kind = 'changes' AND seq = %s",
                [chain_format, previous, hashes, seq],
            )
            previous = hashes[-32:]


@pytest.mark.parametrize("chain_format", [1, 2])
async def test_links_written_in_earlier_formats_verify_and_the_chain_goes_on_after_them(
    history: str, chain_format: int
) -> None:
    """A destination's links written in an earlier format still verify, an edit among them is still located, and
    the worker chains its new links after them."""
    await drain(history, chain_key=KEY)
    as_format(history, KEY, chain_format)
    write(history, 4, start=5)
    await drain(history, chain_key=KEY)
    with psycopg.connect(history) as conn:
        formats = conn.execute("SELECT array_agg(DISTINCT format ORDER BY format) FROM bemi.chain").fetchone()
    assert formats == ([chain_format, chain.CHAIN_FORMAT],)
    assert_intact_then_an_edit_is_found(history, stored=18, victim=3)


async def test_a_link_in_an_unknown_format_is_reported_not_misread(history: str) -> None:
    await drain(history, chain_key=KEY)
    as_superuser(history, "UPDATE bemi.chain SET format = 9 WHERE seq = 1")
    problem = changes_report(history).problem
    assert problem is not None
    assert (problem.kind, problem.link) == ("link", 1)
    assert "format 9" in problem.detail


async def test_a_destination_migrated_before_link_formats_is_told_to_migrate_again(history: str) -> None:
    """The worker, the backfill and verify refuse a `bemi.chain` without its format column (as earlier versions
    created it) and say to run the migration again, which adds it: the links already there are format 1."""
    as_superuser(history, "ALTER TABLE bemi.chain DROP COLUMN format")
    with pytest.raises(DestinationNotReadyError, match=r"bemi\.chain\.format.*sql-migration"):
        await drain(history, chain_key=KEY)
    with pytest.raises(DestinationNotReadyError, match=r"bemi\.chain\.format.*sql-migration"):
        await Backfill(history, chain_key=KEY).run()
    with pytest.raises(DestinationNotReadyError, match=r"bemi\.chain\.format.*sql-migration"):
        verify(history, key=KEY)
    as_superuser(history, migration_sql())
    await drain(history, chain_key=KEY)
    assert changes_report(history).intact

"""`bemi-asgi verify`: walk a stream's hash chains (`worker/chain.py`) and say whether the stored history is the one
the worker and the backfill stored.

For each link of a chain, in order, the changes it covers are read back as its format covers them (`covered_sql`:
their content as the server prints it, or its digest for links of format 1), each chain hash is recomputed from the
previous one and compared with the hash stored when the change was written. The first difference is reported with
where it is:

- **edited**: a change whose content (any covered column, its commit LSN or ordinal) is not what was stored;
- **deleted**: a change the chain covers that is not there (or a link that is missing);
- **inserted**: a change the chain does not cover, among or after the ones it does;
- **link**: a link whose previous hash is not its predecessor's last one (links edited, reordered or replaced).

Otherwise the chain is intact up to its head, whose hash and position are printed so they can be kept elsewhere
and compared later (`--up-to` recomputes the hash at a past position). A chain is read as a stream of links (a
server-side cursor), never whole.

Note: without a key (`BEMI_CHAIN_KEY`), whoever can write `bemi.changes` and `bemi.chain` can recompute every hash
after an edit; only a head published outside the database shows it then. With the key, forging needs the key.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TextIO

import psycopg
from psycopg.rows import dict_row

from .._exceptions import DestinationNotReadyError
from .._pgtext import format_lsn
from ..worker.chain import (
    CHAIN_FORMATS,
    GENESIS,
    READ_BACK_CHANGES,
    ChainKind,
    chain_hasher,
    covered_sql,
    key_id,
    removal,
)
from ..worker.destination import ADDED_COLUMNS

__all__ = ["ChainReport", "Problem", "verify"]

_HASH_BYTES = 32
_KINDS: tuple[ChainKind, ...] = ("changes", "baselines")


@dataclass(frozen=True, slots=True)
class Problem:
    """The first place a chain and the stored changes disagree."""

    kind: Literal["edited", "deleted", "inserted", "link", "key"]
    commit_lsn: int | None = None
    ordinal: int | None = None
    #: The stored change's id, when it is there.
    change_id: int | None = None
    link: int | None = None
    detail: str = ""

    def describe(self) -> str:
        where = []
        if self.commit_lsn is not None:
            where.append(f"change at {format_lsn(self.commit_lsn)} #{self.ordinal}")
        if self.change_id is not None:
            where.append(f"id {self.change_id}")
        if self.link is not None:
            where.append(f"link {self.link}")
        return f"{self.kind}: {self.detail}" + (f" ({', '.join(where)})" if where else "")


@dataclass(slots=True)
class ChainReport:
    """What verify found in one chain."""

    stream: int
    kind: ChainKind
    #: The stream's source, as `bemi.streams` names it (database and slot).
    source: str = ""
    changes: int = 0
    links: int = 0
    #: The hash after the last verified change, and that change's key: the head to publish.
    head: bytes = GENESIS
    position: tuple[int, int] | None = None
    problem: Problem | None = None
    #: Where a prune cut the chain, when it did: (link, entry).
    anchor: tuple[int, int] | None = None
    #: Stored changes of this kind the chain does not cover because they were stored before it began.
    not_covered: int = 0

    @property
    def intact(self) -> bool:
        return self.problem is None

    def describe(self) -> str:
        name = f"{self.kind} of stream {self.stream}" + (f" ({self.source})" if self.source else "")
        if self.problem is not None:
            return f"{name}: NOT INTACT, {self.problem.describe()}"
        if self.position is None:
            text = f"{name}: no chained changes"
        else:
            lsn, ordinal = self.position
            text = (
                f"{name}: intact, {self.changes:,} changes in {self.links:,} links up to {format_lsn(lsn)} #{ordinal}, "
                f"head {self.head.hex()}"
            )
        if self.anchor is not None:
            text += f" (pruned before link {self.anchor[0]} entry {self.anchor[1]})"
        if self.not_covered:
            text += f"; {self.not_covered:,} changes stored before the chain began are not covered"
        return text


def verify(
    dsn: str,
    *,
    streams: Sequence[int] | None = None,
    key: bytes | None = None,
    up_to: int | None = None,
    progress: TextIO | None = None,
    progress_interval: float = 2.0,
) -> list[ChainReport]:
    """Verify the chains (the worker's changes, the backfill's baselines) of `streams` (`bemi.streams` ids; default:
    every stream with a chain); `up_to` stops the changes' chain after the last change committed at or below that
    LSN, to recompute the head published then."""
    with psycopg.connect(dsn, row_factory=dict_row, application_name="bemi-asgi verify") as conn:
        conn.read_only = True
        if missing := _missing_chain_parts(conn):
            raise DestinationNotReadyError(
                f"the destination database lacks {', '.join(missing)}: run `bemi-asgi sql-migration --only destination`"
                " on it again (it adds what is missing and changes nothing else), then verify"
            )
        sources = {
            row["id"]: f"database {row['database']}, slot {row['slot_name']}"
            for row in conn.execute("SELECT id, database, slot_name FROM bemi.streams")
        }
        if streams is None:
            chained = conn.execute("SELECT DISTINCT stream FROM bemi.chain UNION SELECT stream FROM bemi.chain_anchors")
            streams = sorted({row["stream"] for row in chained} or sources)
        reports = []
        for stream in streams:
            for kind in _KINDS:
                walker = _Walker(conn, stream, kind, key, up_to if kind == "changes" else None, progress,
                                 progress_interval)  # fmt: skip
                walker.report.source = sources.get(stream, "")
                reports.append(walker.run())
        return reports


def _missing_chain_parts(conn: psycopg.Connection[Any]) -> list[str]:
    """`bemi.chain`, or the columns of it that destinations migrated by earlier versions lack (`ADDED_COLUMNS`)."""
    if conn.execute("SELECT to_regclass('bemi.chain') IS NULL AS missing").fetchone() == {"missing": True}:
        return ["bemi.chain"]
    missing = []
    for table, column in (added for added in ADDED_COLUMNS if added[0] == "bemi.chain"):
        found = conn.execute(
            "SELECT EXISTS (SELECT FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attname = %s"
            " AND NOT attisdropped) AS found",
            [table, column],
        ).fetchone()
        if found == {"found": False}:
            missing.append(f"{table}.{column}")
    return missing


@dataclass(slots=True)
class _Link:
    seq: int
    previous: bytes
    keys: list[tuple[int, int]]
    removals: int
    hashes: list[bytes]
    key_id: bytes
    format: int


class _Walker:
    def __init__(
        self,
        conn: psycopg.Connection[Any],
        stream: int,
        kind: ChainKind,
        key: bytes | None,
        up_to: int | None,
        progress: TextIO | None,
        progress_interval: float,
    ) -> None:
        self.conn, self.stream, self.kind, self.key, self.up_to = conn, stream, kind, key, up_to
        self.sign = "> 0" if kind == "changes" else "< 0"
        self.report = ChainReport(stream, kind)
        self.progress, self.progress_interval = progress, progress_interval
        self._said = time.monotonic()

    def run(self) -> ChainReport:
        report = self.report
        anchor = self.conn.execute(
            "SELECT seq, entry, hash FROM bemi.chain_anchors WHERE stream = %s AND kind = %s"
            " ORDER BY seq DESC, entry DESC LIMIT 1",
            [self.stream, self.kind],
        ).fetchone()
        expected_seq, skip, previous = 1, 0, GENESIS
        if anchor is not None:
            expected_seq, skip, previous = anchor["seq"], anchor["entry"], bytes(anchor["hash"])
            report.anchor = (expected_seq, skip)
        report.head = previous
        # Baselines a later backfill replaced: their rows are gone by design (`chain.link(removed=...)`).
        removed_later = self._removed_later()
        last_key: tuple[int, int] | None = None
        first = True
        for link in self._links(expected_seq):
            if link.seq != expected_seq:
                return self._fail(Problem("deleted", link=expected_seq, detail=f"links {expected_seq} to "
                                          f"{link.seq - 1} of the chain are missing"))  # fmt: skip
            if link.format not in CHAIN_FORMATS:
                return self._fail(Problem("link", link=link.seq, detail=f"this link is in format {link.format}, "
                                          "which this version of bemi-asgi cannot read: upgrade it"))  # fmt: skip
            if link.key_id != key_id(self.key):
                return self._fail(Problem("key", link=link.seq, detail="this link was written with another chain key "
                                          "(or with none): verify with the worker's BEMI_CHAIN_KEY"))  # fmt: skip
            entries = list(zip(link.keys, link.hashes, strict=True))[skip:]
            if skip == 0 and link.previous != previous:
                return self._fail(Problem("link", link=link.seq, detail="the link does not follow its predecessor "
                                          "(links edited, reordered or replaced)"))  # fmt: skip
            if first and anchor is None and self.kind == "changes" and entries:
                report.not_covered = self._count_before(entries[0][0])
            first = False
            low = last_key if skip == 0 else None  # a pruned link starts at its first remaining entry
            chain_hash = chain_hasher(self.key, link.format)
            # A page of the link's changes at a time: their contents are read whole, and rows can be large.
            for page_start in range(0, len(entries), READ_BACK_CHANGES):
                page = entries[page_start : page_start + READ_BACK_CHANGES]
                rows = self._rows(page, low, link.format)
                covered = {entry_key for entry_key, _ in page}
                extras = sorted(found for found in rows if found not in covered)
                for index, (entry_key, stored) in enumerate(page, start=skip + page_start):
                    if self.up_to is not None and entry_key[0] > self.up_to:
                        return report
                    if extras and extras[0] < entry_key:
                        return self._fail(Problem("inserted", *extras[0], rows[extras[0]][0], link.seq,
                                                  "this change is not in the chain"))  # fmt: skip
                    row = rows.get(entry_key)
                    if index < link.removals:
                        if row is not None:
                            return self._fail(Problem("inserted", *entry_key, row[0], link.seq,
                                                      "a baseline the backfill removed is back"))  # fmt: skip
                        computed = chain_hash(previous, *entry_key, removal(link.format, *entry_key))
                    elif row is None:
                        if entry_key not in removed_later:
                            return self._fail(Problem("deleted", *entry_key, None, link.seq, "this change is gone"))
                        computed = stored  # replaced by a later backfill page, which the chain records
                    else:
                        computed = chain_hash(previous, *entry_key, row[1])
                    if computed != stored:
                        return self._fail(Problem("edited", *entry_key, row[0] if row else None, link.seq,
                                                  "its content is not what was stored (edited, or moved from "
                                                  "another position)"))  # fmt: skip
                    previous = computed
                    report.changes += 1
                    report.head, report.position = computed, entry_key
                    last_key = entry_key
                low = page[-1][0]
            report.links += 1
            expected_seq, skip = link.seq + 1, 0
            self._say()
        if self.up_to is None:
            self._check_after(last_key)
        return report

    def _fail(self, problem: Problem) -> ChainReport:
        self.report.problem = problem
        return self.report

    def _links(self, from_seq: int) -> Iterator[_Link]:
        with self.conn.cursor(name="bemi_verify_links", row_factory=dict_row) as cursor:
            cursor.itersize = 20
            cursor.execute(
                "SELECT seq, previous, commit_lsns, ordinals, removals, hashes, key_id, format FROM bemi.chain"
                " WHERE stream = %s AND kind = %s AND seq >= %s ORDER BY seq",
                [self.stream, self.kind, from_seq],
            )
            for row in cursor:
                hashes = bytes(row["hashes"])
                yield _Link(
                    row["seq"],
                    bytes(row["previous"]),
                    list(zip(row["commit_lsns"], row["ordinals"], strict=True)),
                    row["removals"],
                    [hashes[i : i + _HASH_BYTES] for i in range(0, len(hashes), _HASH_BYTES)],
                    bytes(row["key_id"]),
                    row["format"],
                )

    def _rows(
        self, entries: list[tuple[tuple[int, int], bytes]], low: tuple[int, int] | None, chain_format: int
    ) -> dict[tuple[int, int], tuple[int, bytes]]:
        """The stored changes the entries name, by key: (id, what a link of `chain_format` covers of it: its
        content, or for format 1 its digest). The worker's chain is in commit order, so
        its link's range is read whole, from after the previous link's last key: a change inserted among them is
        there too. The backfill's links name their keys."""
        if not entries:
            return {}
        keys = [entry_key for entry_key, _ in entries]
        covered = covered_sql(chain_format)
        if self.kind == "changes":
            start, inclusive = (keys[0], ">=") if low is None else (low, ">")
            found = self.conn.execute(
                f"SELECT commit_lsn, ordinal, id, {covered} AS covered FROM bemi.changes"
                f" WHERE stream = %s AND (commit_lsn, ordinal) {inclusive} (%s, %s)"
                f"   AND (commit_lsn, ordinal) <= (%s, %s) AND ordinal {self.sign}",
                [self.stream, *start, *keys[-1]],
            ).fetchall()
        else:
            found = self.conn.execute(
                f"SELECT c.commit_lsn, c.ordinal, c.id, {covered} AS covered FROM bemi.changes c"
                " JOIN unnest(%s::bigint[], %s::integer[]) AS k(key_lsn, key_ordinal)"
                "   ON c.stream = %s AND c.commit_lsn = k.key_lsn AND c.ordinal = k.key_ordinal",
                [[key[0] for key in keys], [key[1] for key in keys], self.stream],
            ).fetchall()
        return {(row["commit_lsn"], row["ordinal"]): (row["id"], bytes(row["covered"])) for row in found}

    def _removed_later(self) -> set[tuple[int, int]]:
        rows = self.conn.execute(
            "SELECT commit_lsns[1:removals] AS lsns, ordinals[1:removals] AS ordinals FROM bemi.chain"
            " WHERE stream = %s AND kind = %s AND removals > 0",
            [self.stream, self.kind],
        ).fetchall()
        return {pair for row in rows for pair in zip(row["lsns"], row["ordinals"], strict=True)}

    def _count_before(self, first: tuple[int, int]) -> int:
        row = self.conn.execute(
            f"SELECT count(*) AS n FROM bemi.changes WHERE stream = %s AND (commit_lsn, ordinal) < (%s, %s)"
            f" AND ordinal {self.sign}",
            [self.stream, *first],
        ).fetchone()
        return int(row["n"]) if row else 0

    def _check_after(self, last_key: tuple[int, int] | None) -> None:
        """A change past the chain's head, or (baselines) outside every link, was not stored by the chain's
        writer: the worker and the backfill link what they store in the same transaction."""
        report = self.report
        if self.kind == "changes":
            if last_key is None and report.anchor is None:
                report.not_covered = self._count_before((2**63 - 1, 2**31 - 1))
                return
            row = self.conn.execute(
                "SELECT commit_lsn, ordinal, id FROM bemi.changes"
                f" WHERE stream = %s AND (commit_lsn, ordinal) > (%s, %s) AND ordinal {self.sign}"
                " ORDER BY commit_lsn, ordinal LIMIT 1",
                [self.stream, *(last_key or (-1, 0))],
            ).fetchone()
        else:
            row = self.conn.execute(
                "SELECT c.commit_lsn, c.ordinal, c.id FROM bemi.changes c"
                " WHERE c.stream = %s AND c.ordinal < 0 AND NOT EXISTS ("
                "  SELECT FROM bemi.chain l, unnest(l.commit_lsns, l.ordinals) AS k(commit_lsn, ordinal)"
                "  WHERE l.stream = %s AND l.kind = 'baselines' AND k.commit_lsn = c.commit_lsn"
                "    AND k.ordinal = c.ordinal)"
                " ORDER BY c.commit_lsn, c.ordinal LIMIT 1",
                [self.stream, self.stream],
            ).fetchone()
            if row is not None and report.links == 0 and report.anchor is None:
                report.not_covered = self._count_before((2**63 - 1, 0))
                return
        if row is not None:
            self._fail(Problem("inserted", row["commit_lsn"], row["ordinal"], row["id"], None,
                               "this change is not in the chain"))  # fmt: skip

    def _say(self) -> None:
        now = time.monotonic()
        if self.progress is None or now - self._said < self.progress_interval:
            return
        self._said = now
        report = self.report
        at = f", at {format_lsn(report.position[0])}" if report.position else ""
        print(f"bemi-asgi verify: {report.kind}: {report.changes:,} changes verified{at}", file=self.progress,
              flush=True)  # fmt: skip

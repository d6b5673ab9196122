"""Reading statements with PostgreSQL's parser: transaction control in every spelling, possible writes, linear work."""

from __future__ import annotations

import pytest

from bemi_asgi.capture.statements import CACHED_LENGTH, Step, Writes, _read_cached, read, read_uncached


def steps(query: str) -> list[tuple[Step, str]]:
    statements = read(query)
    assert statements is not None
    return [(s.step, s.savepoint) for s in statements]


def judge(query: str) -> Writes:
    statements = read(query)
    assert statements is not None
    assert len(statements) == 1
    return statements[0].writes


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("COMMIT", Step.COMMIT),
        ("commit;", Step.COMMIT),
        ("COMMIT WORK", Step.COMMIT),
        ("commit transaction", Step.COMMIT),
        ("END", Step.COMMIT),
        ("end work;", Step.COMMIT),
        ("END TRANSACTION", Step.COMMIT),
        ("COMMIT AND NO CHAIN", Step.COMMIT),
        ("COMMIT AND CHAIN", Step.COMMIT_AND_CHAIN),
        ("end and chain", Step.COMMIT_AND_CHAIN),
        ("PREPARE TRANSACTION 'tx-1'", Step.COMMIT),
        ("/* done */ -- really\n  COMMIT", Step.COMMIT),
        ("ROLLBACK", Step.ROLLBACK),
        ("ABORT", Step.ROLLBACK),
        ("abort work", Step.ROLLBACK),
        ("ROLLBACK TRANSACTION AND CHAIN", Step.ROLLBACK_AND_CHAIN),
        ("BEGIN", Step.BEGIN),
        ("BEGIN ISOLATION LEVEL SERIALIZABLE, READ ONLY", Step.BEGIN_READ_ONLY),
        ("START TRANSACTION", Step.BEGIN),
        ("BEGIN READ ONLY", Step.BEGIN_READ_ONLY),
        ("START TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY, DEFERRABLE", Step.BEGIN_READ_ONLY),
        ("BEGIN READ WRITE", Step.BEGIN),
        ("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ", Step.NEUTRAL),
        ("SET LOCAL statement_timeout = 0", Step.NEUTRAL),
        ("SHOW search_path", Step.NEUTRAL),
        ("COMMIT PREPARED 'tx-1'", Step.STATEMENT),
        ("ROLLBACK PREPARED 'tx-1'", Step.STATEMENT),
        ("SELECT 'COMMIT'", Step.STATEMENT),
        ('SELECT 1 AS "commit"', Step.STATEMENT),
        ("-- COMMIT\nSELECT 1", Step.STATEMENT),
        ("SELECT $$; COMMIT; $$", Step.STATEMENT),
    ],
)
def test_transaction_control_in_every_spelling(query: str, expected: Step) -> None:
    """Every spelling PostgreSQL accepts is recognised, and a word inside a literal or comment is not."""
    assert steps(query) == [(expected, "")]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("SAVEPOINT sp1", (Step.SAVEPOINT, "sp1")),
        ("SAVEPOINT Sp1", (Step.SAVEPOINT, "sp1")),
        ('savepoint "My SP"', (Step.SAVEPOINT, "My SP")),
        ("RELEASE SAVEPOINT __asyncpg_savepoint_1__;", (Step.RELEASE, "__asyncpg_savepoint_1__")),
        ("RELEASE sp1", (Step.RELEASE, "sp1")),
        ("ROLLBACK TO sp1", (Step.ROLLBACK_TO, "sp1")),
        ("ROLLBACK TO SAVEPOINT sa_savepoint_1", (Step.ROLLBACK_TO, "sa_savepoint_1")),
        ("rollback work to savepoint sp1", (Step.ROLLBACK_TO, "sp1")),
    ],
)
def test_savepoints_with_their_names(query: str, expected: tuple[Step, str]) -> None:
    """Savepoint statements are recognised with their names, folded to lower case unless quoted."""
    assert steps(query) == [expected]


def test_multi_statement_strings_give_each_statement_and_its_offset() -> None:
    """A multi-statement string yields each statement, starting where a message could be inserted before it."""
    query = "BEGIN; INSERT INTO t VALUES ('é'); /* c */ COMMIT"
    statements = read(query)
    assert statements is not None
    assert [s.step for s in statements] == [Step.BEGIN, Step.STATEMENT, Step.COMMIT]
    raw = query.encode()
    assert raw[statements[2].offset :].startswith(b"COMMIT") or raw[statements[2].offset :].lstrip().startswith(b"/*")
    assert raw[statements[1].offset :].lstrip().startswith(b"INSERT")


def test_unreadable_text_is_none() -> None:
    """Text the parser refuses (the server would too) reads as None."""
    assert read("SELEC 1") is None
    assert read("") == ()


@pytest.mark.parametrize(
    "query",
    [
        "INSERT INTO t VALUES (1)",
        "update t set status = 'prepared'",
        "DELETE FROM t",
        "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE",
        "TRUNCATE t",
        "COPY t FROM '/tmp/x'",
        "WITH x AS (DELETE FROM t RETURNING *) SELECT * FROM x",
        "EXPLAIN ANALYZE INSERT INTO t VALUES (1)",
        "INSERT INTO checkpoint VALUES (1)",
        "INSERT INTO t (note) VALUES ('rebuild concurrently; vacuum')",
        "COPY (DELETE FROM t RETURNING id) TO STDOUT",
    ],
)
def test_data_modifying_statements_write(query: str) -> None:
    """Data-modifying statements write, whatever words their literals, names and comments hold."""
    assert judge(query) is Writes.YES


@pytest.mark.parametrize(
    "query",
    [
        "SELECT bump/**/(1)",
        "SELECT app.count(*) FROM items",
        "SELECT 1 === 2",
        "SELECT OPERATOR(app.+)(1, 2)",
        "SELECT 'x'::app_type",
        "SELECT CAST(x AS app.money) FROM t",
        'SELECT "tôuché"(id) FROM t',
        "SELECT * FROM make_items(3)",
        "EXECUTE write_something(1)",
        "CREATE TABLE t2 AS SELECT bump(1)",
    ],
)
def test_calls_that_may_write(query: str) -> None:
    """Calls the text cannot vouch for (user functions, operators, casts) may write."""
    assert judge(query) is Writes.MAYBE


@pytest.mark.parametrize(
    "query",
    [
        "SELECT * FROM items WHERE id = $1",
        "select last_update, deleted_at, count(*) from t group by 1, 2",
        "/* api */ WITH x AS (SELECT 1) SELECT coalesce(max(a), 0) FROM x WHERE b IN (1, 2)",
        "SELECT pg_catalog.now(), x::int, y::text, 'a' || 'b', z ->> 'k', w BETWEEN 1 AND 2 FROM t",
        "SELECT 'INSERT INTO t VALUES (1)', $$DELETE FROM t$$ -- UPDATE t",
        "SELECT * FROM t FOR UPDATE",
        "EXPLAIN INSERT INTO t VALUES (1)",
        "EXPLAIN (ANALYZE false) INSERT INTO t VALUES (1)",
        "CALL do_things()",
        "DO $$ BEGIN INSERT INTO t VALUES (1); COMMIT; END $$",
        "CREATE INDEX CONCURRENTLY i ON t (x)",
        "VACUUM t",
        "SET search_path = app",
    ],
)
def test_reads_and_statements_never_wrapped(query: str) -> None:
    """Queries of built-ins and words inside literals do not write; CALL, DO and utility commands are never wrapped."""
    assert judge(query) is Writes.NO


@pytest.mark.parametrize(
    ("small", "large"),
    [
        ("SELECT 'x'", "SELECT '" + "x" * 1_000_000 + "'"),
        (" SET LOCAL a.b = 1", " " * 30_000 + "SET LOCAL a.b = 1"),
        ("SELECT $q$x$q$", "SELECT $q$" + "'; COMMIT; (" * 100_000 + "$q$"),
        ("SELECT 1 -- x", "SELECT 1 --" + " x" * 200_000),
    ],
)
def test_pathological_text_costs_no_more_work(small: str, large: str) -> None:
    """Thousands of spaces or a megabyte literal add no work beyond the parser's linear scan: the tree walked has
    exactly as many nodes as for a tiny statement of the same shape."""
    small_statements, small_nodes = read_uncached(small)
    large_statements, large_nodes = read_uncached(large)
    assert small_statements is not None
    assert large_statements is not None
    assert [s.step for s in large_statements] == [s.step for s in small_statements]
    assert large_nodes == small_nodes


def test_many_statements_cost_work_in_proportion() -> None:
    """Work grows linearly with the number of statements in one string."""
    _, one = read_uncached("INSERT INTO t VALUES (1);")
    _, thousand = read_uncached("INSERT INTO t VALUES (1);" * 1000)
    assert thousand <= 1000 * one


def test_reading_is_cached_per_text() -> None:
    """A text read once is not parsed again; texts too long to keep are read afresh, never cached."""
    query = "SELECT count(*) FROM items WHERE id = $1 -- cached"
    read(query)
    before = _read_cached.cache_info()
    for _ in range(100):
        read(query)
    after = _read_cached.cache_info()
    assert after.hits - before.hits == 100
    assert after.misses == before.misses
    long = "SELECT '" + "x" * CACHED_LENGTH + "'"
    read(long)
    assert _read_cached.cache_info().misses == after.misses

"""What the pool reads from a statement's text, with PostgreSQL's own parser (pglast).

Two things, and only these:

- the transaction-control statements, in every spelling the server accepts (`COMMIT`, `END`, `COMMIT WORK`,
  `COMMIT AND CHAIN`, `ABORT`, `ROLLBACK TO SAVEPOINT x`, `PREPARE TRANSACTION 'x'`, ...) with their savepoint
  names, and where each statement of a multi-statement string starts;
- outside a transaction only: whether a statement may write rows, to decide whether the pool wraps it with the
  context. Inside a transaction the server judges (the message at COMMIT is conditional on the transaction having
  an xid) and this judgement is never used.

The parser is PostgreSQL's own (libpg_query, through pglast): literals, dollar quotes, quoted identifiers and
comments are read exactly as the server reads them, in time linear in the text's length. The result is cached per
text (texts up to `CACHED_LENGTH` characters; longer ones are read again each time, still in linear time).

What counts as a possible write (`Writes`): a data-modifying statement anywhere in the tree (INSERT, UPDATE, DELETE,
MERGE, TRUNCATE, COPY FROM, including in a WITH clause or under EXPLAIN ANALYZE) is `YES`; otherwise a call the
text cannot vouch for is `MAYBE`: a function that is not a known side-effect-free built-in or is qualified with a
schema other than pg_catalog, an operator that is not a built-in symbol or is schema-qualified, a cast to a type
that is not built-in, `EXECUTE` of a prepared statement. Everything else is `NO`.

Note: what the text cannot show is judged `NO`: a view whose column calls a function that writes, a function
called with attribute notation (`SELECT t.touch FROM t`), a user function, operator or type that shadows a
built-in name (`count`, `+` on your own type), DDL that evaluates a writing function (`DEFAULT f()` during a
rewrite), event triggers. `CALL` and `DO` are always `NO`: they may COMMIT, which only works when they run alone.
"""

from __future__ import annotations

import enum
import functools
import json
from typing import Any, NamedTuple

from pglast.parser import ParseError, parse_sql_json

__all__ = ["CACHED_LENGTH", "Statement", "Step", "Writes", "read", "read_uncached"]

#: Texts longer than this are not cached (a cache entry keeps its text alive).
CACHED_LENGTH = 16384


class Step(enum.Enum):
    """What a statement does to the transaction."""

    STATEMENT = "statement"  # anything that is not transaction control
    NEUTRAL = "neutral"  # SET / RESET / SHOW: cannot write rows and may have to come first (SET TRANSACTION)
    BEGIN = "begin"  # BEGIN, START TRANSACTION
    BEGIN_READ_ONLY = "begin read only"  # BEGIN / START TRANSACTION ... READ ONLY: the server refuses every write
    COMMIT = "commit"  # COMMIT, END, PREPARE TRANSACTION (the message must precede them)
    COMMIT_AND_CHAIN = "commit and chain"
    ROLLBACK = "rollback"  # ROLLBACK, ABORT
    ROLLBACK_AND_CHAIN = "rollback and chain"
    SAVEPOINT = "savepoint"
    RELEASE = "release"
    ROLLBACK_TO = "rollback to"

    # Members are singletons: hash them by identity in C, not by name in Python (Enum's default), since the pool
    # looks steps up in sets on every COMMIT.
    __hash__ = object.__hash__


class Writes(enum.IntEnum):
    """Whether a statement may write rows, judged from its text (used outside a transaction only)."""

    NO = 0
    MAYBE = 1  # calls something that may write: wrap it, emit only if it did
    YES = 2  # a data-modifying statement


class Statement(NamedTuple):
    """One statement of a query string."""

    step: Step
    writes: Writes
    offset: int  # where it starts, in bytes of the UTF-8 text (where a message may be inserted before it)
    savepoint: str = ""  # the savepoint named by SAVEPOINT / RELEASE / ROLLBACK TO


_TRANSACTION_STEPS = {
    "TRANS_STMT_BEGIN": Step.BEGIN,
    "TRANS_STMT_START": Step.BEGIN,
    "TRANS_STMT_COMMIT": Step.COMMIT,
    "TRANS_STMT_PREPARE": Step.COMMIT,
    "TRANS_STMT_ROLLBACK": Step.ROLLBACK,
    "TRANS_STMT_SAVEPOINT": Step.SAVEPOINT,
    "TRANS_STMT_RELEASE": Step.RELEASE,
    "TRANS_STMT_ROLLBACK_TO": Step.ROLLBACK_TO,
    # COMMIT PREPARED / ROLLBACK PREPARED refuse to run in a transaction block: ordinary statements.
}
_CHAINED = {Step.COMMIT: Step.COMMIT_AND_CHAIN, Step.ROLLBACK: Step.ROLLBACK_AND_CHAIN}
_NEUTRAL = frozenset({"VariableSetStmt", "VariableShowStmt"})


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


# Statements that modify rows wherever they occur in the tree.
_DATA_MODIFYING = frozenset({"InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt", "TruncateStmt"})
# Statements whose tree is read for calls; any other statement (DDL, CALL, DO, SET, ...) is judged `NO` unread.
_READ_TREE = frozenset(
    {"SelectStmt", "CreateTableAsStmt", "DeclareCursorStmt", "CopyStmt", "ExplainStmt", "ExecuteStmt"} | _DATA_MODIFYING
)

# Built-in functions without side effects, called without a schema. A call to anything else may write.
_PURE_FUNCTIONS = _words(
    """
    abs age array_agg array_append array_cat array_length array_lower array_position array_positions array_prepend
    array_remove array_replace array_to_json array_to_string array_upper avg bit_and bit_length bit_or bool_and
    bool_or btrim cardinality cbrt ceil ceiling char_length character_length chr clock_timestamp coalesce concat
    concat_ws convert_from convert_to corr count cume_dist current_database current_schema current_setting
    currval date_bin date_part date_trunc decode degrees dense_rank digest div encode every exp extract
    first_value floor format gen_random_uuid generate_series generate_subscripts greatest hashtext host initcap
    isfinite json_agg json_array_elements json_array_elements_text json_array_length json_build_array
    json_build_object json_each json_each_text json_extract_path json_extract_path_text json_object
    json_object_agg json_object_keys json_populate_record json_strip_nulls json_typeof jsonb_agg
    jsonb_array_elements jsonb_array_elements_text jsonb_array_length jsonb_build_array jsonb_build_object
    jsonb_each jsonb_each_text jsonb_extract_path jsonb_extract_path_text jsonb_insert jsonb_object
    jsonb_object_agg jsonb_object_keys jsonb_path_exists jsonb_path_match jsonb_path_query
    jsonb_path_query_array jsonb_path_query_first jsonb_populate_record jsonb_pretty jsonb_set jsonb_strip_nulls
    jsonb_to_record jsonb_to_recordset jsonb_typeof justify_days justify_hours justify_interval lag last_value
    lastval lead least left length ln log lower lpad ltrim make_date make_interval make_time make_timestamp
    make_timestamptz max md5 min mod now nth_value ntile nullif num_nonnulls num_nulls octet_length overlay
    percent_rank percentile_cont percentile_disc pg_backend_pid pg_column_size pg_typeof pi position power
    quote_ident quote_literal quote_nullable radians random rank regexp_count regexp_instr regexp_like
    regexp_match regexp_matches regexp_replace regexp_split_to_array regexp_split_to_table regexp_substr repeat
    replace reverse right round row_number row_to_json rpad rtrim scale sha256 sign split_part sqrt starts_with
    statement_timestamp stddev stddev_pop stddev_samp string_agg string_to_array string_to_table strpos substr
    substring sum timeofday to_char to_date to_hex to_json to_jsonb to_number to_timestamp to_tsquery to_tsvector
    transaction_timestamp translate trim trim_scale trunc unnest upper var_pop var_samp variance version
    websearch_to_tsquery width_bucket
    """
)
# Built-in operator symbols (and the words pglast uses for BETWEEN): another symbol is a user-defined operator.
_BUILTIN_OPERATORS = _words(
    """
    + - * / % ^ = <> != < > <= >= || ~~ ~~* !~~ !~~* ~ ~* !~ !~* @> <@ && ? ?| ?& -> ->> #> #>> #- @? @@ @@@ |/
    ||/ @ & | # << >> <<= >>= <-> ~= <^ >^ ?# ?- ?-| ?|| ## &< &> &<| |&> <<| |>> -|- @-@ !! ^@
    BETWEEN NOT_BETWEEN BETWEEN_SYMMETRIC NOT_BETWEEN_SYMMETRIC
    """
)
# Built-in type names, as written unqualified (pglast qualifies the SQL-standard spellings with pg_catalog itself).
_BUILTIN_TYPES = _words(
    """
    bigint bit bool boolean box bpchar bytea char character cidr circle date daterange datemultirange decimal
    double float float4 float8 inet int int2 int4 int4range int4multirange int8 int8range int8multirange integer
    interval json jsonb jsonpath line lseg macaddr macaddr8 money name numeric numrange nummultirange oid path
    pg_lsn pg_snapshot point polygon real record regclass regconfig regnamespace regoper regoperator regproc
    regprocedure regrole regtype smallint text tid time timestamp timestamptz timetz tsmultirange tsquery tsrange
    tstzmultirange tstzrange tsvector txid_snapshot uuid varbit varchar xid xid8 xml
    """
)


_FALSE: tuple[dict[str, Any], ...] = ({"String": {"sval": "false"}}, {"String": {"sval": "off"}}, {"Integer": {}})


def _names(items: list[Any]) -> list[str]:
    return [item["String"]["sval"] for item in items if "String" in item]


def _builtin(names: list[str], known: frozenset[str]) -> bool:
    """A (possibly qualified) name is built-in: qualified by pg_catalog, or unqualified and in `known`."""
    if len(names) == 2 and names[0] == "pg_catalog":
        return True
    return len(names) == 1 and names[0] in known


class _Judge:
    """Walks a statement's tree once, counting the nodes it visits (the work done, which tests measure)."""

    __slots__ = ("nodes",)

    def __init__(self) -> None:
        self.nodes = 0

    def statement(self, kind: str, body: dict[str, Any]) -> Writes:
        if kind not in _READ_TREE:
            return Writes.NO
        if kind == "ExplainStmt":
            analyze = [o["DefElem"] for o in body.get("options", []) if o["DefElem"]["defname"] == "analyze"]
            # EXPLAIN ANALYZE runs the statement; EXPLAIN alone (or ANALYZE false/off/0) only plans it.
            runs = bool(analyze) and analyze[-1].get("arg") not in _FALSE
            return self.tree(body.get("query")) if runs else Writes.NO
        if kind == "CopyStmt" and body.get("is_from"):
            return Writes.YES
        if kind == "ExecuteStmt":
            return Writes.MAYBE  # a prepared statement's text is not known here
        if kind in _DATA_MODIFYING:
            return Writes.YES
        return self.tree(body)

    def tree(self, root: Any) -> Writes:
        """The strongest judgement over every node under `root` (stops at the first data-modifying one)."""
        result = Writes.NO
        stack = [root]
        while stack:
            value = stack.pop()
            self.nodes += 1
            if isinstance(value, dict):
                for key, item in value.items():
                    if key in _DATA_MODIFYING:
                        return Writes.YES
                    if result is Writes.NO and self._may_write(key, item):
                        result = Writes.MAYBE
                    if isinstance(item, dict | list):
                        stack.append(item)
            elif isinstance(value, list):
                stack.extend(item for item in value if isinstance(item, dict | list))
        return result

    @staticmethod
    def _may_write(key: str, node: Any) -> bool:
        if key == "FuncCall":
            return not _builtin(_names(node["funcname"]), _PURE_FUNCTIONS)
        if key == "A_Expr":
            names = _names(node.get("name", []))
            if len(names) > 1:
                return names[0] != "pg_catalog"
            return bool(names) and names[0] not in _BUILTIN_OPERATORS
        if key == "TypeCast":
            return not _builtin(_names(node["typeName"]["names"]), _BUILTIN_TYPES)
        return key == "ExecuteStmt"


def _read_only(options: list[dict[str, Any]]) -> bool:
    """BEGIN's options say READ ONLY (the last transaction_read_only option wins, as in the server)."""
    read_only = False
    for option in options:
        element = option.get("DefElem", {})
        if element.get("defname") == "transaction_read_only":
            read_only = element.get("arg", {}).get("A_Const", {}).get("ival", {}).get("ival") == 1
    return read_only


def _statements(query: str, judge: _Judge) -> tuple[Statement, ...] | None:
    try:
        parsed = json.loads(parse_sql_json(query))
    except ParseError:
        return None
    result = []
    for raw in parsed.get("stmts", []):
        ((kind, body),) = raw["stmt"].items()
        offset = raw.get("stmt_location", 0)
        judge.nodes += 1
        if kind == "TransactionStmt":
            step = _TRANSACTION_STEPS.get(body["kind"], Step.STATEMENT)
            if step is Step.BEGIN and _read_only(body.get("options", [])):
                step = Step.BEGIN_READ_ONLY
            if body.get("chain"):
                step = _CHAINED.get(step, step)
            result.append(Statement(step, Writes.NO, offset, body.get("savepoint_name", "")))
        elif kind in _NEUTRAL:
            result.append(Statement(Step.NEUTRAL, Writes.NO, offset))
        else:
            result.append(Statement(Step.STATEMENT, judge.statement(kind, body), offset))
    return tuple(result)


def read_uncached(query: str) -> tuple[tuple[Statement, ...] | None, int]:
    """The statements of `query` (None when the parser cannot read it) and the number of tree nodes visited."""
    judge = _Judge()
    return _statements(query, judge), judge.nodes


@functools.lru_cache(maxsize=4096)
def _read_cached(query: str) -> tuple[Statement, ...] | None:
    return read_uncached(query)[0]


def read(query: str) -> tuple[Statement, ...] | None:
    """The statements of `query`, or None when the parser cannot read it; cached per text."""
    if len(query) > CACHED_LENGTH:
        return read_uncached(query)[0]
    return _read_cached(query)

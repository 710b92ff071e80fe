"""What a user's query may read: llmpulse's tables and a few system tables, nothing else.

Guarantee: a query given to `/api/query`, the store owner's query endpoint or `llmpulse query`
runs only if every table it reads is in the llmpulse database or on `SYSTEM_TABLES`, it calls
no table function and no function that reaches outside the query's tables, it writes no file
and it sets no SETTINGS of its own. Defends against reading the host (`file()`, `url()`,
`s3()` ...), reaching other servers (`remote()`, `cluster()` ...), reading other databases
(`merge()`, `system.users`, `joinGet()`), writing the host's files (`INTO OUTFILE`, which
chDB carries out in the owner's process even under readonly=1) and lifting the limits
(`SETTINGS max_rows_to_read = 0`).

Never by matching the SQL text (comments, case, quoting, WITH, subqueries, JOIN and UNION
make that bypassable), with one exception that only ever refuses: no `;` (`one_statement`).
Then ClickHouse's own parser decides what the query is, in three steps that execute nothing
of it:
1. `EXPLAIN AST`: the parse tree. Table functions are the `Function` children of a
   `TableExpression`; tables are `TableIdentifier`s (and the right side of IN); a SETTINGS
   clause is a `Set` node. Every one is checked here, before anything is resolved.
2. `EXPLAIN QUERY TREE run_passes=0`: the unresolved query tree, which names the WITH
   tables (`cte_name`): an unqualified table name must be one of them.
3. `EXPLAIN QUERY TREE`: the analyzer's resolved tree; every `TABLE` it reads is checked
   again (a second net behind steps 1-2) and any `TABLE_FUNCTION` refuses the query.
ClickHouse's readonly=1 (set by `readonly.run_readonly`) is the engine-level net behind all
three: no writes, no file/url/remote/executable table functions, no SETTINGS changes.

Table functions: the allow-list is empty. Every table function either reaches outside the
tables (file, url, s3, remote, cluster, mysql, executable ...), reads other databases
(merge, view over anything, dictionary) or only computes (numbers, values, zeros), which
the dashboard never needs and a caller can write without (arrays, `arrayJoin(range(n))`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from llmpulse.errors import LLMPulseError

# system tables that describe llmpulse's own schema and storage; nothing about users,
# settings, queries, processes, the host or other servers
SYSTEM_TABLES = frozenset({"one", "tables", "columns", "parts"})

# table functions a query may call; see the module docstring for why none
TABLE_FUNCTIONS: frozenset[str] = frozenset()

# scalar functions that read a file, a dictionary or a table named by a string, or
# describe the host. Hundreds of pure functions remain allowed, so this one is a deny-list;
# table access itself is on the allow-list above.
DENIED_FUNCTIONS = frozenset({
    "file", "joinget", "joingetornull", "hascolumnintable", "filesystemavailable",
    "filesystemcapacity", "filesystemunreserved", "getserversetting", "getmacro",
    "catboostevaluate", "modelevaluate", "evalmlmethod", "addresstoline",
    "addresstolinewithinlines", "addresstosymbol", "demangle",
})  # fmt: skip
DENIED_PREFIXES = ("dict",)  # dictGet*, dictHas, dictIsIn ...: dictionaries may load files or URLs

# functions whose right argument may name a table (`x IN system.users`)
IN_FUNCTIONS = frozenset({"in", "notin", "globalin", "globalnotin", "nullin", "notnullin",
                          "globalnullin", "globalnotnullin"})  # fmt: skip

Explain = Callable[[str], list[str]]


class QueryRefused(LLMPulseError):
    """The query asks for something llmpulse does not allow; `status` is its HTTP status."""

    status = 403


class QueryLimitExceeded(QueryRefused):
    """The query ran into a limit (rows or bytes read, memory, time)."""

    status = 400


def readable(database: str) -> str:
    return f"queries may read only the tables of database {database} and system.{', system.'.join(sorted(SYSTEM_TABLES))}"


@dataclass
class Node:
    text: str
    depth: int
    children: list[Node] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return self.text.split(" ", 1)[0]

    @property
    def name(self) -> str:
        """The second word: a function's or table's name (`Function file (alias f) (children 1)`)."""
        parts = self.text.split(" ")
        return parts[1].strip("`") if len(parts) > 1 else ""


def parse_tree(lines: Iterable[str]) -> list[Node]:
    """`EXPLAIN AST` lines (one space of indent per level) as a tree."""
    roots: list[Node] = []
    stack: list[Node] = []
    for line in lines:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip(" "))
        node = Node(line.strip(), depth)
        while stack and stack[-1].depth >= depth:
            stack.pop()
        (stack[-1].children if stack else roots).append(node)
        stack.append(node)
    return roots


def _walk(nodes: list[Node]) -> Iterable[tuple[Node, Node | None]]:
    todo: list[tuple[Node, Node | None]] = [(n, None) for n in nodes]
    while todo:
        node, parent = todo.pop()
        yield node, parent
        todo.extend((c, node) for c in node.children)


def _split(name: str) -> tuple[str | None, str]:
    db, dot, table = name.rpartition(".")
    return (db.strip("`\"") if dot else None), table.strip("`\"")


def check_table(name: str, database: str) -> str | None:
    """None if `db.table` may be read; the reason otherwise. Unqualified names: the caller's."""
    db, table = _split(name)
    if db == database or (db == "system" and table in SYSTEM_TABLES):
        return None
    return f"refused: table {name} is not readable here; {readable(database)}"


def check_ast(lines: list[str], database: str) -> set[str]:
    """Refuse what the parse tree shows; return the unqualified table names it reads."""
    roots = parse_tree(lines)
    for node, _ in _walk(roots):
        # a cut answer (a result-row limit of the server's profile) would hide part of the query
        if (m := _CHILDREN.search(node.text)) and int(m.group(1)) != len(node.children):
            raise QueryRefused("refused: the query's parse tree came back incomplete; it cannot be checked")
    if not roots or roots[0].kind not in ("SelectWithUnionQuery", "SelectIntersectExceptQuery"):
        got = roots[0].kind if roots else "nothing"
        raise QueryRefused(f"refused: queries are read-only: only SELECT is allowed here; INSERT, ALTER, DROP "
                           f"and other statements are not (this is {got})")
    unqualified: set[str] = set()
    # the FORMAT of the EXPLAIN itself (chDB's client appends `FORMAT Native`) is the root's
    # last Identifier child; a FORMAT inside the user's text fails to parse before this
    for node, parent in _walk(roots[:1]):
        kind = node.kind
        if kind == "Literal" and parent is not None and parent.kind == "SelectWithUnionQuery":
            # `INTO OUTFILE 'path'`: the file name is the query's own literal child. chDB writes
            # that file in this process even under readonly=1 (measured, chDB 26.9), and so
            # does an EXPLAIN QUERY TREE of it: refused here, before steps 2-3 run
            raise QueryRefused("refused: INTO OUTFILE is not allowed: queries return rows, they write no files")
        if kind == "Set":
            raise QueryRefused("refused: a query may not carry SETTINGS; llmpulse sets the limits "
                               "(clickhouse.query_max_* in the config)")  # fmt: skip
        if kind == "Function" and parent is not None and parent.kind == "TableExpression":
            if node.name.lower() not in TABLE_FUNCTIONS:
                raise QueryRefused(f"refused: table function {node.name}() is not allowed (no table function is: "
                                   f"they read files, URLs, other servers or databases); {readable(database)}")  # fmt: skip
        elif kind == "Function":
            low = node.name.lower()
            if low in DENIED_FUNCTIONS or low.startswith(DENIED_PREFIXES):
                raise QueryRefused(f"refused: function {node.name}() is not allowed here: it reads "
                                   f"files, dictionaries or tables by name, or describes the host")  # fmt: skip
            if low in IN_FUNCTIONS and node.children and len(node.children[0].children) == 2:
                right = node.children[0].children[1]
                if right.kind == "Identifier":
                    unqualified |= _table_name(right.name, database)
        elif kind == "TableIdentifier":
            unqualified |= _table_name(node.name, database)
        elif kind not in _KNOWN_KINDS:
            # a construct this check was not written for: refuse rather than guess
            raise QueryRefused(f"refused: the query uses {kind}, which this read-only endpoint does not allow")
    return unqualified


def _table_name(name: str, database: str) -> set[str]:
    db, table = _split(name)
    if db is None:
        return {table}
    reason = check_table(name, database)
    if reason:
        raise QueryRefused(reason)
    return set()


_CHILDREN = re.compile(r"\(children (\d+)\)$")
_CTE = re.compile(r"\bcte_name: (\S+?),?$")
_TABLE = re.compile(r"^\s*TABLE id: \d+.*?\btable_name: (.+?)$")


def check_cte_names(lines: list[str], unqualified: set[str], database: str) -> None:
    """Every unqualified table name must be a WITH name of the query (never another database's table)."""
    ctes = {m.group(1).strip("`") for line in lines if (m := _CTE.search(line))}
    for name in sorted(unqualified - ctes):
        raise QueryRefused(f"refused: table {name} is not a WITH name of the query; name tables with their "
                           f"database ({database}.{name}); {readable(database)}")  # fmt: skip


def check_resolved(lines: list[str], database: str) -> None:
    """The analyzer's own list of what the query reads: every TABLE allowed, no TABLE_FUNCTION."""
    for line in lines:
        stripped = line.lstrip()
        if stripped.startswith("TABLE_FUNCTION "):
            m = re.search(r"table_function_name: ([^,\s]+)", stripped)
            raise QueryRefused(f"refused: table function {m.group(1) if m else '?'}() is not allowed; {readable(database)}")
        if m := _TABLE.match(line):
            reason = check_table(m.group(1).strip(), database)
            if reason:
                raise QueryRefused(reason)


def one_statement(sql: str) -> str:
    """`sql` without a trailing `;`; refused if any other `;` is left.

    chDB runs every statement of a `a; b` text, each with only the settings of the last one
    (measured: `EXPLAIN AST SELECT 1; DROP TABLE t` drops t). So no `;` may reach ClickHouse,
    not even one inside a string or a comment: deciding which `;` separate statements would
    need ClickHouse's lexer, and a wrong guess runs a write. Inside a string, char(59) is `;`.
    """
    text = sql.strip().removesuffix(";").rstrip()
    if ";" in text:
        raise QueryRefused("refused: one statement per query: ';' is not allowed, not even in a string "
                           "or a comment (write char(59) for it in a string)")  # fmt: skip
    if not text:
        raise QueryRefused("refused: the query is empty")
    return text


def guard(sql: str, database: str, explain: Explain, resolve: Explain) -> str:
    """Refuse `sql` unless it reads only what llmpulse allows (see the module docstring);
    return the text to run (one statement, no trailing `;`).

    `explain(text)` runs `text` (an EXPLAIN) and returns its lines, with no settings of the
    caller's; `resolve(text)` runs it under the query's own limits and readonly=1 (the
    analyzer may evaluate scalar subqueries over tables already checked).
    """
    sql = one_statement(sql)
    unqualified = check_ast(explain(f"EXPLAIN AST {sql}"), database)
    if unqualified:
        check_cte_names(explain(f"EXPLAIN QUERY TREE run_passes = 0 {sql}"), unqualified, database)
    check_resolved(resolve(f"EXPLAIN QUERY TREE {sql}"), database)
    return sql


# parse-tree node kinds of a SELECT; anything else is refused by check_ast
_KNOWN_KINDS = frozenset({
    "SelectWithUnionQuery", "SelectIntersectExceptQuery", "SelectQuery", "ExpressionList",
    "TablesInSelectQuery", "TablesInSelectQueryElement", "TableExpression", "TableIdentifier",
    "TableJoin", "ArrayJoin", "Subquery", "WithElement", "Identifier", "Literal", "Asterisk",
    "QualifiedAsterisk", "ColumnsRegexpMatcher", "ColumnsListMatcher", "QualifiedColumnsRegexpMatcher",
    "QualifiedColumnsListMatcher", "ColumnsTransformerList", "ColumnsExceptTransformer",
    "ColumnsReplaceTransformer", "ColumnsApplyTransformer", "ColumnsReplaceTransformer::Replacement",
    "OrderByElement", "Interpolate", "InterpolateElement", "WindowDefinition", "WindowListElement",
    "SampleRatio", "QueryParameter", "Function", "Set", "LimitByElement", "TTLElement",
    "CollationElement", "DataType", "NameTypePair", "ObjectTypeArgument",
})  # fmt: skip

"""Import layering: the stream worker does not import the actions package, and the rules
never import the worker (issue 15 item 5: `worker_app -> actions/rootcause ->
streams/rules/rootcause` was a package cycle). Read from the import statements."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "llmpulse"


def imports_of(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_streams_do_not_import_actions_and_rules_do_not_import_the_worker() -> None:
    bad = []
    for path in sorted((ROOT / "streams").rglob("*.py")):
        names = imports_of(path)
        rel = path.relative_to(ROOT.parent)
        bad += [f"{rel}: {n}" for n in names if n == "llmpulse.actions" or n.startswith("llmpulse.actions.")]
        if "rules" in path.relative_to(ROOT / "streams").parts[:1] or path.name == "rules_hook.py":
            bad += [f"{rel}: {n}" for n in names if n.startswith("llmpulse.streams.worker_app")]
    assert bad == []
    # and the checker sees imports at all: the worker does import the rules' root causes
    assert "llmpulse.streams.rules.rootcause.explain_window" in imports_of(ROOT / "streams" / "worker_app.py")

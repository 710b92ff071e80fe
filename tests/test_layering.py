"""Import layering (issue 15 item 5):
- the stream worker does not import the actions package, and the rules never import the
  worker (`worker_app -> actions/rootcause -> streams/rules/rootcause` was a package cycle);
- Faust stays behind one adapter: in streams/, only worker_app.py imports it (and
  credentials.py, inside the one function that builds Faust's credentials object), so the
  stages and their state can be read and tested without it.
Read from the import statements, nested ones included."""

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
    # and the checker sees imports at all: stage 2 does import the rules' root causes
    assert "llmpulse.streams.rules.rootcause.explain_window" in imports_of(ROOT / "streams" / "finalize_stage.py")


def test_only_the_adapter_imports_faust() -> None:
    users = sorted(
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "streams").rglob("*.py")
        if any(n == "faust" or n.startswith("faust.") for n in imports_of(path))
    )
    assert users == ["streams/credentials.py", "streams/worker_app.py"]
    # nor does anything in streams/ import the adapter (the CLI starts it)
    assert not [p for p in (ROOT / "streams").rglob("*.py") if any(n.startswith("llmpulse.streams.worker_app") for n in imports_of(p))]

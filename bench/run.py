"""Run one benchmark: `python bench/run.py NAME [args]` runs bench/NAME.py's main().

It prints the figures and writes them to bench/results/NAME.json (flat keys, units in
the names). Speed targets live here, never in the test suite.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    if len(sys.argv) < 2:
        names = sorted(
            p.stem for p in HERE.glob("*.py")
            if p.stem not in ("run", "__init__", "common") and "\ndef main(" in p.read_text()
        )  # fmt: skip
        print(f"usage: python bench/run.py NAME   (one of: {', '.join(names)})")
        return 2
    name = sys.argv[1]
    path = HERE / f"{name}.py"
    if not path.exists():
        print(f"no benchmark named {name!r} ({path} does not exist)")
        return 2
    sys.path.insert(0, str(HERE.parent))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    sys.argv = [str(path), *sys.argv[2:]]
    figures = module.main()
    figures = {"benchmark": name, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **figures}
    out = HERE / "results" / f"{name}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(figures, indent=2) + "\n")
    for k, v in figures.items():
        print(f"{k:>36}: {v}")
    print(f"written to {out.relative_to(HERE.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

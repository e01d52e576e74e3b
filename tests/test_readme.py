"""The README's Python API example runs as written."""

import re
import subprocess
import sys
from pathlib import Path


def test_readme_python_example_runs():
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    (code,) = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    r = subprocess.run([sys.executable, "-"], input=code, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("12 layers, loss")


def _table(text: str) -> str:
    """The first markdown table that starts with a '| method |' header."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| method |"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "\n".join(lines[start:end])


def test_readme_demo_table_is_the_committed_demo_result():
    """The README's demo table is exactly what `make demo` wrote (benchmarks/results/demo is its copy)."""
    root = Path(__file__).parents[1]
    readme = (root / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("**Measured** (`make demo`"):]
    assert _table(section) == _table((root / "benchmarks/results/demo/results.md").read_text(encoding="utf-8"))

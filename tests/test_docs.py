"""The README and docs/ stay true to the code: docs/cli.md is what docs/make_cli.py generates now, every relative
link resolves (anchors into markdown files included), and every `apollo` command of a ```bash block parses.

Commands: every line of a ```bash block of README.md and docs/**/*.md that runs apollo (it starts with `apollo `
or `.venv/bin/apollo `, or runs `-m apollo` under torchrun), after joining lines that end in `\\` and dropping
`# comments`. A `...` placeholder fails the test: the commands are meant to be copied as they are.

- `train` and `compare` run in-process with `--dry-run`, each in an empty temporary directory where every local
  data file the command names (`--data`, `--valid`, `--test`) exists as a one-line placeholder: the config is
  resolved and checked as a real run would check it before reading data (method, run length, memory, run
  directory ...), the stage plan is printed, and the test checks that nothing was written.
- Parsed with the real parser only: commands that need what an earlier command of the page writes (a run to
  `--resume` or to grow from with `--small-model`, a `--config`, a `--model-config`, a `--tokenizer`), commands
  under torchrun (their world size and devices are the launch's), and `finetune` / `evaluate` (they need trained
  runs).
- `plan` runs in full (it reads no data).
"""

import importlib.util
import re
import shlex
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
NEEDS_EARLIER_OUTPUT = ("--resume", "--small-model", "--config", "--model-config", "--tokenizer")
DATA_FLAGS = ("--data", "--valid", "--test")


def _make_cli():
    spec = importlib.util.spec_from_file_location("make_cli", ROOT / "docs" / "make_cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_is_current():
    page = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    python = f"<!-- argparse layout of Python {sys.version_info.major}.{sys.version_info.minor} -->"
    if python not in page:
        pytest.skip("docs/cli.md was generated under another Python, whose argparse lays out help differently")
    assert page == _make_cli().render(), "docs/cli.md is stale: run `python docs/make_cli.py`"


def _without_code(text: str) -> str:
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: Counter = Counter()
    anchors = set()
    for line in re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M).splitlines():
        m = re.match(r"#{1,6} (.+)", line)
        if m:
            slug = _slug(m.group(1))
            anchors.add(slug if not seen[slug] else f"{slug}-{seen[slug]}")
            seen[slug] += 1
    return anchors


def test_relative_links_resolve():
    bad = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", _without_code(page.read_text(encoding="utf-8"))):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(ROOT)}: {target}"
            if not resolved.exists():
                bad.append(f"{where} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                bad.append(f"{where} (no such heading)")
    assert not bad, "broken links:\n" + "\n".join(bad)


def _commands() -> list[tuple[str, list[str], bool]]:
    """(where, apollo's argv, under torchrun) of every apollo command in a bash block."""
    found = []
    for page in PAGES:
        for block in re.findall(r"^```bash\n(.*?)^```", page.read_text(encoding="utf-8"), flags=re.S | re.M):
            for line in block.replace("\\\n", " ").splitlines():
                tokens = shlex.split(line, comments=True)
                while tokens and re.match(r"\w+=", tokens[0]):  # VAR=value prefixes
                    tokens = tokens[1:]
                if not tokens:
                    continue
                where = f"{page.relative_to(ROOT)}: {line.strip()[:100]}"
                if tokens[0] in ("apollo", ".venv/bin/apollo"):
                    found.append((where, tokens[1:], False))
                elif "-m" in tokens and tokens[tokens.index("-m") + 1:][:1] == ["apollo"]:
                    found.append((where, tokens[tokens.index("-m") + 2:], True))
    return found


def test_every_page_has_commands_found():
    pages = {where.split(":")[0] for where, _, _ in _commands()}
    for page in ("README.md", "docs/training.md", "docs/checkpoints.md", "docs/distributed.md", "docs/evaluation.md",
                 "docs/methods/apollo-jump.md"):
        assert page in pages, page


def _data_files(argv: list[str]) -> list[str]:
    files, current = [], None
    for token in argv:
        if token.startswith("--"):
            current = token
        elif current in DATA_FLAGS:
            files.append(token)
    return files


@pytest.mark.parametrize("where, argv, torchrun", _commands(), ids=[w for w, _, _ in _commands()])
def test_command_parses(where, argv, torchrun, tmp_path, monkeypatch, capsys):
    from apollo.cli import build_parser, main

    assert "..." not in argv, f"{where}: a placeholder; write the command out"
    monkeypatch.chdir(tmp_path)
    try:
        build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: {capsys.readouterr().err.strip()}")
    command = argv[0]
    if torchrun or command in ("finetune", "evaluate") or any(f in argv for f in NEEDS_EARLIER_OUTPUT):
        return
    for name in _data_files(argv):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("a placeholder line of text\n", encoding="utf-8")
    before = sorted(tmp_path.rglob("*"))
    rc = main([*argv, "--dry-run"] if command in ("train", "compare") else argv)
    out, err = capsys.readouterr()
    assert rc == 0, f"{where}: {err.strip()}"
    assert "| stage |" in out or "| method |" in out or "stage plan:" in out, out
    assert sorted(tmp_path.rglob("*")) == before, f"{where} wrote files"


def test_python_api_page_shows_the_readme_example():
    """The README's example is run by tests/test_readme.py; the API page shows the same code."""
    def block(path):
        (code,) = re.findall(r"```python\n(.*?)```", (ROOT / path).read_text(encoding="utf-8"), flags=re.S)
        return code
    assert block("docs/python-api.md") == block("README.md")

"""docs/cli.md is generated from the ctrl-data parsers (`python -m data_tools.cli_docs`) and must match them."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

from data_tools.cli_docs import DOCS_PATH, render

ROOT = Path(__file__).resolve().parents[1]


def test_docs_cli_md_is_up_to_date():
    # A fresh interpreter: other tests register transforms and procedures in this one, which would
    # show up in the choice lists. A narrow COLUMNS: the text must not depend on the terminal.
    env = {**os.environ, "COLUMNS": "37", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "data_tools.cli_docs", "--stdout"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert DOCS_PATH == ROOT / "docs" / "cli.md"
    current = DOCS_PATH.read_text(encoding="utf-8") if DOCS_PATH.exists() else ""
    assert result.stdout == current, (
        "docs/cli.md differs from the ctrl-data parsers: run `python -m data_tools.cli_docs` to update it")


def _toy_parser():
    parser = argparse.ArgumentParser(prog="tool", description="A tool.")
    stages = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    sub = stages.add_parser("go", help="go somewhere | fast", description="Go *somewhere* <now>.",
                            epilog="examples:\n  tool go here --out x/\n", formatter_class=argparse.RawDescriptionHelpFormatter)
    sub.add_argument("where", help="the place")
    sub.add_argument("--out", required=True, help="output folder")
    sub.add_argument("--n", nargs="+", type=int, default=[1, 2], metavar="N", help="sizes")
    sub.add_argument("--mode", choices=["a", "b"], default="a")
    sub.add_argument("--range", nargs=2, metavar=("LOW", "HIGH"))
    sub.add_argument("--old", help=argparse.SUPPRESS)
    group = sub.add_mutually_exclusive_group()
    group.add_argument("--keep", action="store_true", help="keep (default)")
    group.add_argument("--drop", dest="keep", action="store_false", help="drop")
    return parser


def test_render_format(monkeypatch):
    monkeypatch.setenv("COLUMNS", "20")
    text = render(_toy_parser())
    assert "\n## tool go\n\nGo" in text
    assert "| [`go`](#tool-go) | go somewhere \\| fast |" in text
    assert "Go \\*somewhere\\* \\<now\\>." in text
    assert ("usage: tool go --out OUT [--n N [N ...]] [--mode {a,b}] [--range LOW HIGH] [--keep | --drop]"
            " where") in text
    assert "- `--out OUT`: output folder; required" in text
    assert "- `--n N [N ...]`: sizes; default `1 2`" in text
    assert "- `--mode {a,b}`: default `a`" in text
    assert "--old" not in text  # hidden arguments stay hidden
    assert "```text\nexamples:\n  tool go here --out x/\n```" in text
    monkeypatch.setenv("COLUMNS", "300")
    assert render(_toy_parser()) == text

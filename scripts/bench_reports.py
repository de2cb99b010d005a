"""What the per-server benchmark scripts share: measure one server or merge earlier runs, then one table.

    python scripts/bench_X.py URL --label NAME --json a.json     # measure a server, keep its result
    python scripts/bench_X.py --merge a.json --merge b.json      # put results side by side (--markdown FILE)
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", nargs="?", help="the server's OpenAI base URL, e.g. http://127.0.0.1:3000/v1")
    parser.add_argument("--label", default="server")
    parser.add_argument("--json", type=Path, help="write this run's result here")
    parser.add_argument("--merge", type=Path, action="append", default=[], help="an earlier result (repeatable)")
    parser.add_argument("--markdown", type=Path, help="write the table here too")


def median_run(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The run whose ``key`` is the median (the upper one of an even count): a whole run, so that its other
    figures (the answer, the usage) belong to the same request."""
    return sorted(runs, key=lambda run: run[key])[len(runs) // 2]


def finish(args: argparse.Namespace, measure: Callable[[], dict[str, Any]],
           table: Callable[[list[dict[str, Any]]], str]) -> None:
    """Merge ``--merge`` results with this run's (``measure()``, when a URL was given), print the table and
    write what was asked for."""
    results = [json.loads(path.read_text()) for path in args.merge]
    if args.url:
        results.append(measure())
        if args.json:
            args.json.write_text(json.dumps(results[-1], indent=1))
    text = table(results)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")

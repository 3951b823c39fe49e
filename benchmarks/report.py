"""Render benchmark JSON results into a section of benchmarks/RESULTS.md.

Each benchmark stores the markdown tables it printed (``"report"``) and the
machine it ran on; this script puts them between ``<!-- BEGIN <section> -->``
and ``<!-- END <section> -->`` markers in RESULTS.md (appending the section
when the markers are absent), leaving the hand-written text around them alone.

    python benchmarks/report.py --section cpu benchmarks/results/transport.json ...
    python benchmarks/report.py --section gpu --steps steps.json benchmarks/results/gpu/*.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import _common

ORDER = ("accuracy", "transport", "wire_format", "inprocess", "serving")


def render(results: list[dict], *, title: str, steps: list[dict] | None = None, extra: str = "") -> str:
    parts = [f"## {title}", ""]
    machines = {_common.machine_line(r["machine"]) for r in results if "machine" in r}
    if machines:
        parts += ["Measured on:", ""] + [f"- {line}" for line in sorted(machines)] + [""]
    if steps:
        parts.append(_common.table(steps, ["step", "status", "seconds", "summary"], title="Steps"))
        parts.append("")
    if extra:
        parts += [extra.strip(), ""]
    results = sorted(results, key=lambda r: ORDER.index(r.get("benchmark")) if r.get("benchmark") in ORDER else len(ORDER))
    for result in results:
        name = result.get("benchmark", "?")
        config = result.get("config", {})
        command = result.get("command") or f"python benchmarks/{name}.py" + (" --quick" if config.get("quick") else "")
        parts += [f"### {name}: `{command}`", ""]
        if result.get("partial"):
            parts += ["Cut short (time limit or failure): the rows finished so far.", ""] + partial_tables(result)
        for part in result.get("report", []):
            parts += [re.sub(r"^### ", "#### ", part, flags=re.M), ""]
    return "\n".join(parts).rstrip() + "\n"


def partial_tables(result: dict) -> list[str]:
    """Tables from a partial result, which has its rows but not its printed report."""
    tables = []
    runs = result.get("runs")
    if runs:
        rows = [
            {
                "model": r.get("encoder"),
                "input": r.get("input"),
                "streams": r.get("streams"),
                "max wait ms": r.get("max_wait_ms"),
                "cuda graphs": "yes" if r.get("cuda_graphs") else "no",
                "fps": r.get("fps"),
                "p50 ms": r.get("latency", {}).get("p50"),
                "p99 ms": r.get("latency", {}).get("p99"),
                "errors": r.get("errors"),
            }
            for r in runs
        ]
        tables.append(_common.table(rows, list(rows[0])))
    for key in ("end_to_end", "forward"):
        rows = result.get(key)
        if rows:
            tables.append(_common.table(rows, list(rows[0]), title=key))
    return [t + "\n" for t in tables]


def replace_section(text: str, section: str, body: str) -> str:
    begin, end = f"<!-- BEGIN {section} -->", f"<!-- END {section} -->"
    block = f"{begin}\n{body}{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        return head + block + tail
    return text.rstrip() + "\n\n" + block + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", help="benchmark JSON files")
    parser.add_argument("--section", required=True, help="marker name, for example cpu or gpu")
    parser.add_argument("--title", default=None)
    parser.add_argument("--steps", default=None, help="a JSON list of {step, status, seconds, summary} (gpu_run.sh)")
    parser.add_argument("--extra", default="", help="markdown put before the tables")
    parser.add_argument("--output", default=str(_common.HERE / "RESULTS.md"))
    args = parser.parse_args()
    results = []
    for path in args.results:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            print(f"skipped {path}: {exc}", file=sys.stderr)
            continue
        if isinstance(data, dict) and "benchmark" in data:
            results.append(data)
    steps = json.loads(Path(args.steps).read_text()) if args.steps and Path(args.steps).exists() else None
    title = args.title or f"{args.section.upper()} results"
    body = render(results, title=title, steps=steps, extra=args.extra)
    output = Path(args.output)
    text = output.read_text() if output.exists() else "# Benchmark results\n"
    output.write_text(replace_section(text, args.section, body))
    print(f"wrote section {args.section!r} of {output} from {len(results)} result files")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What health, bench and predict print: plain text (no colours, so it reads the same in logs) or JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .common import cli_words

__all__ = ["format_bench", "format_health", "format_predict_summary"]


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        return "-"
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def format_health(address: str, info: dict[str, Any]) -> str:
    """The health map as a plain text table."""
    queued = info.get("queued_total", 0)
    lines = [
        (
            f"broker {address}  version {info.get('version', '?')}  up {_duration(info.get('uptime_s'))}  "
            f"queued {queued}/{info.get('queue_limit', '?')}  in flight {info.get('in_flight', 0)}"
        ),
        f"models: {', '.join(info.get('models') or []) or '(none)'}",
        "",
    ]
    workers = info.get("workers") or []
    if not workers:
        lines.append("no workers connected")
        return "\n".join(lines)
    header = ("WORKER", "HOST", "DEVICE", "PRECISION", "MODELS", "LOAD", "SERVED", "FAILED", "UPTIME", "STATE")
    rows = [
        (
            str(w.get("name", "?")),
            str(w.get("host") or w.get("peer") or "-"),
            str(w.get("device") or "-"),
            str(w.get("precision") or "-"),
            ",".join(w.get("models") or []),
            f"{w.get('in_flight', 0)}/{w.get('capacity', '?')}",
            str(w.get("served", 0)),
            str(w.get("failed", 0)),
            _duration(w.get("uptime_s")),
            "draining" if w.get("draining") else "ready",
        )
        for w in workers
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return "\n".join(lines)


def format_bench(address: str, report: dict[str, Any]) -> str:
    lat = report["latency_ms"]
    lines = [
        (
            f"bench: {report['clients']} client(s) x {report['in_flight']} in flight, {report['seconds']:.1f} s, "
            f"{report['size']} frames, model {report['model'] or '(server default)'}"
            + (f", depth maps as {report['depth_codec']}" if report.get("depth_codec", "none") != "none" else "")
            + f", against {address}"
        ),
        f"frames      {report['frames']}  ({report['fps']:.1f} frames/s)",
    ]
    if report["frames"]:
        lines.append(
            f"latency ms  p50 {lat['p50']:.1f}  p90 {lat['p90']:.1f}  p99 {lat['p99']:.1f}  (mean {lat['mean']:.1f}, min {lat['min']:.1f}, max {lat['max']:.1f})"
        )
    errors = report["errors"]
    detail = ", ".join(f"{code} {n}" for code, n in sorted(report["errors_by_code"].items()))
    lines.append(f"errors      {errors}" + (f"  ({detail})" if detail else ""))
    for message in report.get("error_samples", []):
        lines.append(f"  e.g. {message}")
    return "\n".join(lines)


def format_predict_summary(summary: Any, out: Path, json_out: bool) -> str:
    """``zdepth.client.files.Summary`` as one JSON line, or a line of totals and one per failure."""
    if json_out:
        return json.dumps({**summary.as_dict(), "out": str(out)})
    per = f", {summary.ms_per_frame:.1f} ms per image" if summary.ms_per_frame is not None else ""
    lines = [f"{summary.frames} image(s) in {summary.seconds:.2f} s{per}; {summary.written} file(s) written to {out}"]
    if summary.failures:
        lines.append(f"{len(summary.failures)} failed:")
        lines += [f"  {failure.name}: {cli_words(failure.reason)}" for failure in summary.failures]
    return "\n".join(lines)

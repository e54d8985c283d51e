"""The results table: one row per (model, probe), top-1 and top-5 in percent."""
from __future__ import annotations

from typing import Dict


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def format_table(results: Dict[str, Dict[str, dict]]) -> str:
    """{model tag: {probe: {"top1", "top5", "seconds"}}} -> a fixed-width text table."""
    rows = [("model", "probe", "top-1 %", "top-5 %", "seconds")]
    for tag, probes in results.items():
        for probe, r in probes.items():
            rows.append((tag, probe, _pct(r["top1"]), _pct(r["top5"]), f"{r['seconds']:.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)

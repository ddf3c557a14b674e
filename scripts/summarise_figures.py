#!/usr/bin/env python3
"""Summarise scripts/transport_figures.sh output: median (min-max) per label."""
import json, statistics, sys
from collections import OrderedDict

rows = OrderedDict()
for line in open(sys.argv[1]):
    r = json.loads(line)
    rows.setdefault(r["label"], []).append(r["report"])

def fmt(vals, nd=2):
    vals = [v for v in vals if v is not None]
    if not vals:
        return "-"
    m = statistics.median(vals)
    return f"{m:.{nd}f} ({min(vals):.{nd}f}-{max(vals):.{nd}f})" if len(vals) > 1 else f"{m:.{nd}f}"

keys = [("guest_gib_per_s", 2), ("total_ms", 0), ("wire_gbit_per_s", 1),
        ("transfer_wire_gbit_per_s", 1), ("downtime_ms", 1), ("limit_wire_gbit_per_s", 1),
        ("wire_vs_limit", 2), ("transfer_vs_limit", 2), ("limit_mem_wire_gbit_per_s", 1),
        ("wire_vs_mem_limit", 2)]
print("| label | n | verified | " + " | ".join(k for k, _ in keys) + " | wire/guest |")
print("|---|---|---|" + "---|" * (len(keys) + 1))
for label, rs in rows.items():
    ok = all(r.get("verified") and r.get("memory_equal", True) for r in rs)
    cells = [fmt([r.get(k) for r in rs], nd) for k, nd in keys]
    ratio = fmt([r["bytes_on_wire"] / r["memory_bytes"] for r in rs], 3)
    print(f"| {label} | {len(rs)} | {ok} | " + " | ".join(cells) + f" | {ratio} |")

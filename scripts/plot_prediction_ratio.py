#!/usr/bin/env python3
"""Strip chart of measured ÷ predicted downtime per converged run, from the compact
convergence-matrix rows in docs/results (one JSON object per run with `host`,
`build`, `converged` and `ratio`), one column per (host, build) and one dot per run,
with the target's line at 1.25. Plain SVG, no plotting library needed.

usage: scripts/plot_prediction_ratio.py ROWS.jsonl OUT.svg
"""
import json
import sys

rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
groups = []
for r in rows:
    key = (r["host"], r["build"])
    if key not in groups:
        groups.append(key)
# Idle first, then busy; within each, the baseline build (main) first, then the
# others in the order the file first names them.
builds = []
for r in rows:
    if r["build"] not in builds:
        builds.append(r["build"])
groups.sort(key=lambda k: (k[0] != "idle", not k[1].startswith("main"), builds.index(k[1])))

H, LEFT, TOP, BOTTOM = 490, 70, 40, 400
# Room for each column's three lines of labels.
W = max(960, LEFT + 40 + 130 * len(groups))
top = max(2.0, max((r["ratio"] for r in rows if r.get("converged")), default=1.0) * 1.05)
y = lambda v: BOTTOM - (BOTTOM - TOP) * v / top
col = (W - LEFT - 40) / max(1, len(groups))
out = [
    f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
    '<rect width="100%" height="100%" fill="white"/>',
    f'<text x="{LEFT}" y="22" font-size="15">measured ÷ predicted downtime, one dot per converged run '
    "(convergence matrix, 2 GiB)</text>",
]
ticks = 5
for i in range(ticks + 1):
    v = top * i / ticks
    out.append(f'<line x1="{LEFT}" x2="{W - 40}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#ddd"/>'
               f'<text x="{LEFT - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.2f}</text>')
out.append(f'<line x1="{LEFT}" x2="{W - 40}" y1="{y(1.25):.1f}" y2="{y(1.25):.1f}" '
           'stroke="#d62728" stroke-dasharray="6,4"/>'
           f'<text x="{W - 42}" y="{y(1.25) - 4:.1f}" text-anchor="end" fill="#d62728">target p95 ≤ 1.25</text>')
colours = {"idle": "#1f77b4", "one core busy": "#ff7f0e"}
for gi, (host, build) in enumerate(groups):
    cx = LEFT + col * (gi + 0.5)
    mine = [r for r in rows if (r["host"], r["build"]) == (host, build)]
    ok = sorted((r for r in mine if r.get("converged")), key=lambda r: r["ratio"])
    for j, r in enumerate(ok):
        # Spread the dots sideways by matrix so that repeated sittings stay apart.
        dx = (r.get("matrix", 1) - 2) * 9 + ((j % 3) - 1) * 2
        fill = colours.get(host, "#555")
        out.append(f'<circle cx="{cx + dx:.1f}" cy="{y(r["ratio"]):.1f}" r="3" fill="{fill}" fill-opacity="0.7"/>')
    ratios = [r["ratio"] for r in ok]
    worst = max(ratios) if ratios else 0
    matrices = len({r.get("matrix", 1) for r in mine})
    out.append(f'<text x="{cx:.1f}" y="{BOTTOM + 18}" text-anchor="middle">{host}</text>')
    out.append(f'<text x="{cx:.1f}" y="{BOTTOM + 34}" text-anchor="middle">{build}</text>')
    out.append(f'<text x="{cx:.1f}" y="{BOTTOM + 50}" text-anchor="middle" fill="#555">'
               f'{matrices} {"matrix" if matrices == 1 else "matrices"}, {len(ok)} runs</text>')
    out.append(f'<text x="{cx:.1f}" y="{BOTTOM + 66}" text-anchor="middle" fill="#555">max {worst:.2f}</text>')
out.append("</svg>")
open(sys.argv[2], "w").write("\n".join(out) + "\n")

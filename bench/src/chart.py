# Draws the chart of `pgferry bench` from its results JSON:  python - results.json chart.png
# (report.rs sends this file on stdin). Three panels: backlog drain (median txn/s over the
# repetitions), latency (p50 and p99, log scale) and three nodes all writing (aggregate
# txn/s), one bar colour per system.
import json
import statistics
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

results_path, png_path = sys.argv[1], sys.argv[2]
with open(results_path) as f:
    r = json.load(f)
systems = r["systems"]
colours = dict(zip(systems, ["#d95f02", "#1b9e77", "#7570b3"]))
width = 0.8 / max(len(systems), 1)


def grouped(ax, groups, value, label_fmt):
    """Bars per group (x) and system (colour); value(group, system) -> float or None."""
    for si, system in enumerate(systems):
        xs, ys = [], []
        for gi, g in enumerate(groups):
            v = value(g, system)
            if v is not None:
                xs.append(gi + (si - (len(systems) - 1) / 2) * width)
                ys.append(v)
        bars = ax.bar(xs, ys, width, label=system, color=colours[system])
        ax.bar_label(bars, labels=[label_fmt(y) for y in ys], fontsize=7, padding=2)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([g if isinstance(g, str) else g[0] for g in groups], fontsize=8)


def not_run(ax, what):
    ax.axis("off")
    ax.text(0.5, 0.5, f"{what}: not run", ha="center", va="center", fontsize=9, transform=ax.transAxes)


fig, axes = plt.subplots(1, 3, figsize=(15, 4.8), gridspec_kw={"width_ratios": [2, 3, 1.3]})

ax = axes[0]
if not r["drains"]:
    not_run(ax, "backlog drain")
workloads = list(dict.fromkeys(d["workload"] for d in r["drains"]))
# One entry per repetition: the bar is the median.
rates = {}
for d in r["drains"]:
    rates.setdefault((d["workload"], d["system"]), []).append(d["txn_per_s"])
drain = {k: statistics.median(v) for k, v in rates.items()}
grouped(ax, workloads, lambda g, s: drain.get((g, s)), lambda y: f"{y:,.0f}")
ax.set_title("Backlog drain n1 → n2, median (higher is better)", fontsize=10)
ax.set_ylabel("transactions / s")
if r["drains"]:
    ax.legend(fontsize=8)

ax = axes[1]
if not r["latencies"]:
    not_run(ax, "latency")
runs = []
for l in r["latencies"]:
    key = f'{l["workload"]}\n@ {l["rate"]:,} tps'
    if key not in runs:
        runs.append(key)
lat = {(f'{l["workload"]}\n@ {l["rate"]:,} tps', l["system"]): l for l in r["latencies"]}
grouped(ax, runs, lambda g, s: lat[(g, s)]["p99_ms"] if (g, s) in lat else None, lambda y: f"{y:.0f}")
for si, system in enumerate(systems):
    for gi, g in enumerate(runs):
        if (g, system) in lat:
            x = gi + (si - (len(systems) - 1) / 2) * width
            ax.plot([x - width / 2, x + width / 2], [lat[(g, system)]["p50_ms"]] * 2, color="black", lw=1.5)
if r["latencies"]:
    ax.axhline(100, color="grey", ls="--", lw=0.8)
    ax.set_yscale("log")
ax.set_title("Latency commit n1 → visible n2: bar p99, line p50 (lower is better)", fontsize=10)
ax.set_ylabel("milliseconds (log)")

ax = axes[2]
if not r["mesh"]:
    not_run(ax, "three nodes")
mesh = {m["system"]: m["txn_per_s"] for m in r["mesh"]}
if r["mesh"]:
    grouped(ax, ["3 nodes"], lambda g, s: mesh.get(s), lambda y: f"{y:,.0f}")
    ax.set_xlim(-0.5, 0.5)
    for si, system in enumerate(systems):
        if system in mesh and mesh[system] is None:
            x = (si - (len(systems) - 1) / 2) * width
            ax.text(x, 0, f" {system}: no figure (see table)", ha="center", va="bottom", fontsize=7, rotation=90)
ax.set_title("3 nodes all writing: aggregate", fontsize=10)
ax.set_ylabel("transactions / s")

fig.suptitle(r["title"], fontsize=11)
fig.tight_layout()
fig.savefig(png_path, dpi=100)

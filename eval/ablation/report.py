"""The ablation's outputs: a markdown table, a json file (also the resume state) and a Pareto plot."""
from __future__ import annotations

import math
from pathlib import Path

COLUMNS = [  # (key, header, format)
    ("ppl", "ppl", "{:.3f}"),
    ("delta_pct", "Δ% ppl", "{:+.2f}"),
    ("size_mb", "size MB", "{:.1f}"),
    ("prefill_tps", "prefill tok/s", "{:.0f}"),
    ("decode_tps", "decode tok/s", "{:.1f}"),
    ("ttft_ms", "TTFT ms", "{:.0f}"),
    ("peak_mem_mb", "peak mem MB", "{:.0f}"),
    ("mbu", "MBU", "{:.1%}"),
    ("speedup", "speedup", "{:.2f}x"),
]
NUMERIC = [k for k, _, _ in COLUMNS]


def derive(rows: dict) -> dict:
    """Δ% and speedup against the baseline row (same device for speed, same chunks for quality)."""
    base = rows.get("baseline", {})
    for name, r in rows.items():
        if r.get("status") != "ok":
            continue
        if base.get("ppl") and r.get("ppl") is not None:
            r["delta_pct"] = 100.0 * (r["ppl"] / base["ppl"] - 1.0)
        if base.get("decode_tps") and r.get("decode_tps") is not None and \
                r.get("speed_device", base.get("speed_device")) == base.get("speed_device"):
            r["speedup"] = r["decode_tps"] / base["decode_tps"]
    return rows


def _cell(r: dict, key: str, fmt: str, mark: str) -> str:
    v = r.get(key)
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    s = fmt.format(v)
    speed_keys = ("prefill_tps", "decode_tps", "ttft_ms", "mbu", "speedup", "peak_mem_mb")
    return s + mark if key in speed_keys and mark else s


def markdown(state: dict, order: list[str]) -> str:
    rows = derive(state["rows"])
    s = state["settings"]
    head = [f"| level | {' | '.join(h for _, h, _ in COLUMNS)} | notes |",
            "|---|" + "---:|" * len(COLUMNS) + "---|"]
    body, foot = [], []
    for name in order:
        r = rows.get(name)
        if r is None:
            continue
        label = f"`{name}`" if not name.startswith("peer:") else f"*{name[5:]}* (peer)"
        if r.get("status") != "ok":
            body.append(f"| {label} | " + " | ".join("—" for _ in COLUMNS) + f" | {r.get('status')}: {r.get('note', '')} |")
            continue
        mark = "*" if r.get("speed_indicative") else ""
        cells = [_cell(r, k, f, mark) for k, _, f in COLUMNS]
        notes = [r.get("what", "")] + ([r["note"]] if r.get("note") else [])
        if r.get("tokens_per_round"):
            notes.append(f"{r['tokens_per_round']:.2f} tokens per target pass")
        src = _sources(r, s)
        if src:
            notes.append(src)
        body.append(f"| {label} | " + " | ".join(cells) + " | " + "; ".join(n for n in notes if n) + " |")
    if any(r.get("speed_indicative") for r in rows.values()):
        foot.append("\\* speed on a CPU: indicative only (XLA's CPU backend, shared cores; the levels' kernels "
                    "and formats target GPUs/TPUs, where their speed is measured by the accelerator mode).")
    top = [f"model `{s['model']}`, data `{s['data']}:{s['split']}` ({_chunks_text(rows)}, ctx {s['ctx']}, "
           f"{s['protocol']} protocol), calibration {s['calib_seqs']} x {s['calib_len']} tokens of "
           f"`{s['data']}:train`; speed: batch-1 prompt of {s['prompt_len']} tokens, {s['new_tokens']} greedy "
           f"tokens, prefill batch {s['prefill_batch']} x {s['prompt_len']}; speed dtype {s['speed_dtype']}",
           f"device {state.get('device', '?')}, {state.get('date', '?')}, commit {state.get('commit', '?')}"]
    return "\n".join(top) + "\n\n" + "\n".join(head + body) + "\n" + ("\n" + "\n".join(foot) + "\n" if foot else "")


def _chunks_text(rows: dict) -> str:
    n = rows.get("baseline", {}).get("n_chunks")
    return f"{n} chunks" if n else "chunks"


def _sources(r: dict, s: dict) -> str:
    """Where the cells came from, when quality and speed come from different devices."""
    qd, sd = r.get("quality_device"), r.get("speed_device")
    if qd and sd and qd != sd:
        return f"quality: {qd} ({r.get('quality_date', '?')}, commit {r.get('quality_commit', '?')}); speed: {sd}"
    return ""


def pareto_front(points: list[tuple[str, float, float]]) -> list[str]:
    """Names of the points no other point beats in both speed (higher) and perplexity (lower)."""
    front = []
    for n, x, y in points:
        if not any((x2 >= x and y2 <= y) and (x2 > x or y2 < y) for _, x2, y2 in points):
            front.append(n)
    return front


# label positions tried around a point, in points: right-above first, then below, left, further out
_OFFSETS = [(5, 4, "left"), (5, -11, "left"), (-5, 4, "right"), (-5, -11, "right"), (5, 14, "left"),
            (5, -21, "left"), (-5, 14, "right"), (-5, -21, "right")]


def _place_labels(fig, ax, pts) -> None:
    """Annotate each point at the first offset whose label box overlaps no label placed before
    (points from the top of the plot down); where none is free, the first offset."""
    fig.canvas.draw()  # final limits and a renderer to measure text with
    renderer = fig.canvas.get_renderer()
    placed = []

    def put(label, x, y, offset):
        dx, dy, ha = offset
        t = ax.annotate(label, (x, y), fontsize=8, xytext=(dx, dy), textcoords="offset points", ha=ha)
        return t, t.get_window_extent(renderer)

    for label, x, y in sorted(pts, key=lambda p: (-p[2], p[1])):
        for offset in _OFFSETS:
            t, box = put(label, x, y, offset)
            if not any(box.overlaps(b) for b in placed):
                break
            t.remove()
        else:
            t, box = put(label, x, y, _OFFSETS[0])
        placed.append(box)


def plot(state: dict, order: list[str], path: str | Path) -> None:
    """Perplexity vs decode tokens/s, one point per row, the Pareto front joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = derive(state["rows"])
    pts = [(n, rows[n]["decode_tps"], rows[n]["ppl"]) for n in order
           if n in rows and rows[n].get("status") == "ok" and rows[n].get("decode_tps") and rows[n].get("ppl")]
    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    if pts:
        front = pareto_front(pts)
        for n, x, y in pts:
            peer = n.startswith("peer:")
            ax.scatter([x], [y], s=60 if n in front else 36, marker="s" if peer else "o",
                       color="#888888" if peer else ("#c44e52" if n in front else "#4c72b0"), zorder=3)
        fp = sorted((p for p in pts if p[0] in front), key=lambda p: p[1])
        ax.plot([p[1] for p in fp], [p[2] for p in fp], color="#c44e52", lw=1, ls="--", zorder=2,
                label="Pareto front (faster and better: down-right)")
        base = rows.get("baseline", {}).get("ppl")
        if base:
            ax.axhline(base, color="gray", lw=0.6, ls=":", label="baseline perplexity")
        xs = [p[1] for p in pts]
        if max(xs) / max(min(xs), 1e-9) > 8:
            ax.set_xscale("log")
        ax.margins(x=0.12, y=0.12)
        ax.legend(fontsize=8, loc="best")
        _place_labels(fig, ax, [(n[5:] if n.startswith("peer:") else n, x, y) for n, x, y in pts])
    else:
        ax.text(0.5, 0.5, "no row with both perplexity and decode speed", ha="center", transform=ax.transAxes)
    s = state["settings"]
    indicative = " (CPU: indicative)" if any(r.get("speed_indicative") for r in rows.values()) else ""
    ax.set_xlabel(f"decode tokens/s, batch 1{indicative}")
    ax.set_ylabel(f"perplexity ({s['data']}:{s['split']}, ctx {s['ctx']})")
    ax.set_title(f"{s['model']}: quality vs decode speed per level\n{state.get('device', '')}, "
                 f"{state.get('date', '')}, commit {state.get('commit', '')}", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv=None):
    """`python -m eval.ablation.report ablation.json`: the table and plot from a json (e.g. of a run
    cut off by a time limit: its finished rows)."""
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m eval.ablation.report", description=main.__doc__)
    ap.add_argument("json")
    ap.add_argument("--markdown", default=None, help="default: the json's path with .md")
    ap.add_argument("--plot", default=None, help="default: the json's path with .png")
    args = ap.parse_args(argv)
    path = Path(args.json)
    state = json.loads(path.read_text())
    order = state.get("order") or list(state["rows"])
    table = markdown(state, order)
    Path(args.markdown or path.with_suffix(".md")).write_text(table)
    plot(state, order, args.plot or path.with_suffix(".png"))
    print(table)


if __name__ == "__main__":
    main()

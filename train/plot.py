"""Compare training runs side by side: training loss and held-out perplexity against steps.

    python -m train.plot out/kd out/ce --labels "KD (mix soft T=2)" "CE only" --out docs/training_kd_vs_ce.png \\
        --title "..."
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from flashit_jax.errors import FlashitError, user_errors


def load_metrics(run: Path) -> list[dict]:
    p = Path(run) / "metrics.jsonl"
    if not p.exists():
        raise FlashitError(f"{run}: no metrics.jsonl (not a training run directory?)")
    return [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()]


def plot_runs(runs: list[Path], labels: list[str], out: Path, title: str = "", smooth: int = 10) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    step0: list[str] = []
    for run, label in zip(runs, labels):
        recs = load_metrics(run)
        tr = [r for r in recs if "ce" in r]
        ev = [r for r in recs if "eval_ppl" in r]
        steps = np.array([r["step"] for r in tr])
        ce = np.array([r["ce"] for r in tr])
        if len(ce) >= smooth > 1:
            k = np.ones(smooth) / smooth
            a.plot(steps[smooth - 1:], np.convolve(ce, k, mode="valid"), label=label)
        else:
            a.plot(steps, ce, label=label)
        # the step-0 point (the untrained student) would squash the axis: it goes in the label;
        # the final eval may use more chunks than the periodic ones: it gets its own marker
        first = next((r for r in ev if r["step"] == 0), None)
        periodic = [r for r in ev if r["step"] > 0 and r["eval_chunks"] == (ev[min(1, len(ev) - 1)]["eval_chunks"])]
        final = [r for r in ev if r["step"] > 0 and r not in periodic]
        if first:
            step0.append(f"{first['eval_ppl']:.3g}")
        line, = b.plot([r["step"] for r in periodic], [r["eval_ppl"] for r in periodic], "o-",
                       label=f"{label} ({periodic[0]['eval_chunks'] if periodic else '?'} chunks)")
        for r in final:
            b.plot([r["step"]], [r["eval_ppl"]], "*", ms=12, color=line.get_color(),
                   label=f"{label}: final {r['eval_ppl']:.1f} ({r['eval_chunks']} chunks)")
    a.set_xlabel("step"), a.set_ylabel(f"training data CE (moving mean of {smooth})"), a.legend(fontsize=8)
    b.set_xlabel("step"), b.set_ylabel("validation perplexity"), b.set_yscale("log"), b.legend(fontsize=8)
    if step0:
        b.set_title(f"held-out perplexity (step 0: {' / '.join(step0)})", fontsize=9)
    a.grid(alpha=0.3), b.grid(alpha=0.3, which="both")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m train.plot", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run directories (OUT of train.distill / train.finetune)")
    ap.add_argument("--labels", nargs="+", default=None)
    ap.add_argument("--out", required=True)
    ap.add_argument("--title", default="")
    ap.add_argument("--smooth", type=int, default=10)
    args = ap.parse_args(argv)
    with user_errors("train.plot"):
        labels = args.labels or [Path(r).name for r in args.runs]
        if len(labels) != len(args.runs):
            raise FlashitError(f"{len(args.runs)} runs but {len(labels)} labels")
        plot_runs([Path(r) for r in args.runs], labels, Path(args.out), args.title, args.smooth)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Iterative magnitude pruning with re-fine-tuning, and the lottery-ticket procedure with rewinding.

    python -m train.imp --model smollm2-135m --rounds 3 --rate 0.2 --rewind-step 4 --steps 16 --out out/lt
    python -m train.imp ... --mode finetune        # IMP without rewinding (keep the trained values)

Round 0 fine-tunes the dense model for --steps steps and checkpoints at --rewind-step k (θ_k).
Round r = 1..R prunes by global magnitude (the weights removed in earlier rounds go first and
stay removed) to a total sparsity 1 - (1 - rate)^r of the layer matrices, then
  --mode rewind (lottery ticket, "late rewinding", Frankle et al. 2019): every surviving weight,
      and every other parameter, goes back to θ_k; train steps - k steps;
  --mode finetune (IMP): keep the trained values; train the same steps - k steps.
Each round's optimizer and schedule start fresh. OUT/round_r/ is an ordinary training run
(resumable, its model in OUT/round_r/model with MaskedArray weights); OUT/imp.json lists the
rounds. Every TrainConfig flag (--data, --batch-size, --lr, ...) applies to every round.
"""
from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

from flashit_jax.errors import FlashitError, user_errors
from train.config import parse_args

PROG = "python -m train.imp"


def checkpoint_params(run_dir: Path, step: int, model, params, cfg):
    """The model parameters (fp32) of run_dir's checkpoint at `step`."""
    import jax

    from flashit_jax import sharding as shd
    from train.checkpoint import Checkpointer
    from train.loop import build_state
    from train.optim import make_optimizer

    mesh = shd.make_mesh(cfg.mesh_data, cfg.mesh_fsdp, cfg.mesh_tensor)
    like, _ = build_state(model, params, {}, make_optimizer(cfg), mesh, cfg.seed)
    ck = Checkpointer(run_dir / "ckpt", every=1, keep=1 << 20, async_save=False)
    try:
        steps = ck.mngr.all_steps()
        if step not in steps:
            raise FlashitError(f"{run_dir}: no checkpoint at step {step} (have {sorted(steps)})")
        state, _ = ck.restore(step, like)
    finally:
        ck.close()
    return jax.device_get(state["params"]["model"])


def _done(run_dir: Path) -> bool:
    return (run_dir / "summary.json").exists() and (run_dir / "model" / "config.json").exists()


def run_imp(cfg, *, rounds: int, rate: float, rewind_step: int, mode: str, scope: str = "global", log=print) -> dict:
    from flashit_jax import prune as pr
    from flashit_jax import tree
    from flashit_jax.loading import load_model
    from flashit_jax.prune import iterative as it
    from train.loop import Task, run
    from train.step import Objective

    if mode not in ("rewind", "finetune"):
        raise FlashitError(f"--mode must be rewind (lottery ticket) or finetune (IMP), got {mode!r}")
    if rounds < 1:
        raise FlashitError(f"--rounds must be >= 1, got {rounds}")
    if not 0 < rewind_step < cfg.steps:
        raise FlashitError(f"--rewind-step must be in 1 .. steps-1 ({cfg.steps - 1}), got {rewind_step}")
    it.round_sparsity(rate, 1)  # validates the rate
    out = Path(cfg.out)
    base = load_model(cfg.model, "float32", seed=cfg.seed)
    if pr.masks_of(base.params):
        raise FlashitError(f"{cfg.model} is already pruned; start the lottery-ticket procedure from a dense model")
    rows = []

    # ---- round 0: dense fine-tuning, θ_k checkpointed
    r0 = out / "round_0"
    c0 = cfg.replace(out=str(r0), ckpt_every=rewind_step, keep_checkpoints=cfg.steps // rewind_step + 1, save_model=True)
    if not _done(r0):
        s = run(c0, Task(base.model, base.params, base.tokenizer, Objective(loss="ce"), transforms=list(base.transforms),
                         record={"transform": "imp", "round": 0, "model": cfg.model, "loss": "ce"}), prog="imp round 0")
        s.pop("state", None)
    trained = load_model(str(r0 / "model"), "float32").params
    early = checkpoint_params(r0, rewind_step, base.model, base.params, c0)
    summary0 = json.loads((r0 / "summary.json").read_text())
    rows.append({"round": 0, "sparsity": 0.0, "model": str(r0 / "model"), "eval_ppl": summary0.get("eval_ppl")})
    log(f"imp: round 0 (dense): held-out ppl {summary0.get('eval_ppl')}")

    keep = None
    for r in range(1, rounds + 1):
        sp = it.round_sparsity(rate, r)
        keep = it.imp_masks(trained, keep, sp, scope=scope)
        start = it.rewind(early, keep) if mode == "rewind" else it.apply_keep(pr.densify(trained), keep)
        rd = out / f"round_{r}"
        like = tree.unflatten({**tree.flatten(start), **{p: pr.MaskedArray.create(tree.flatten(start)[p], keep[p])
                                                           for p in keep}})
        if not _done(rd):
            task = Task(base.model, start, base.tokenizer, Objective(loss="ce"), transforms=list(base.transforms),
                        record={"transform": "imp", "round": r, "mode": mode, "rate": rate, "sparsity": round(sp, 6),
                                "rewind_step": rewind_step, "scope": scope, "model": cfg.model, "loss": "ce"},
                        masks=tree.unflatten({p: keep[p] for p in keep}),
                        prepare_save=lambda p, like=like: pr.resparsify(p, like))
            s = run(cfg.replace(out=str(rd), steps=cfg.steps - rewind_step), task, prog=f"imp round {r}")
            s.pop("state", None)
        trained = load_model(str(rd / "model"), "float32").params
        got = pr.sparsity(trained)["sparsity"]
        summ = json.loads((rd / "summary.json").read_text())
        rows.append({"round": r, "sparsity": got, "target_sparsity": sp, "model": str(rd / "model"),
                     "eval_ppl": summ.get("eval_ppl")})
        log(f"imp: round {r} ({mode}): sparsity {100 * got:.2f}% (target {100 * sp:.2f}%), held-out ppl "
            f"{summ.get('eval_ppl')}")
    rec = {"mode": mode, "rate": rate, "rounds": rounds, "rewind_step": rewind_step, "steps": cfg.steps,
           "scope": scope, "date": datetime.date.today().isoformat(), "rounds_detail": rows}
    (out / "imp.json").write_text(json.dumps(rec, indent=2))
    return rec


def main(argv=None):
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rate", type=float, default=0.2, help="fraction of the remaining weights pruned per round")
    ap.add_argument("--rewind-step", type=int, default=4, help="k: the checkpoint of round 0 rewound to")
    ap.add_argument("--mode", default="rewind", choices=["rewind", "finetune"])
    ap.add_argument("--scope", default="global", choices=["global", "layer"])
    own, rest = ap.parse_known_args(argv)
    cfg = parse_args(rest, prog=PROG, description=__doc__ + "\nIMP flags: --rounds --rate --rewind-step --mode --scope",
                     defaults={"out": "out/imp", "loss": "ce", "teacher": ""})
    with user_errors("train.imp"):
        return run_imp(cfg, rounds=own.rounds, rate=own.rate, rewind_step=own.rewind_step, mode=own.mode,
                       scope=own.scope)


if __name__ == "__main__":
    main()

"""Train Medusa heads on a frozen base model.

    python -m train.medusa --model smollm2-135m --heads 3 --steps 2000 --out runs/medusa-smollm2
    python -m eval.generate --model smollm2-135m --medusa heads=runs/medusa-smollm2,tree=4x2x1

Only the heads learn (AdamW, cosine schedule); the base runs forward to give its final hidden
states. Labels: `base` (default, self-distillation) uses the base's own greedy prediction at every
position, which is what the heads must match for greedy decoding to accept their tokens; `data`
uses the text itself. Resumes from `OUT/checkpoint.npz` (heads, optimizer state, step); the batch
order is a function of (seed, step), so a resumed run sees the same batches.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def token_rows(tokenizer, docs, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Each document cut into rows of seq_len (the tail padded, marked invalid)."""
    rows, valid = [], []
    for d in docs:
        ids = tokenizer.encode(d.text)
        for i in range(0, len(ids) - 2, seq_len):
            piece = ids[i: i + seq_len]
            r = np.zeros(seq_len, np.int32)
            r[: len(piece)] = piece
            v = np.zeros(seq_len, bool)
            v[: len(piece)] = True
            rows.append(r)
            valid.append(v)
    return np.stack(rows), np.stack(valid)


def _save_checkpoint(path: Path, heads, opt_state, step: int) -> None:
    import jax

    leaves = jax.tree.leaves((heads, opt_state))
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, step=np.int64(step), **{f"l{i}": np.asarray(x) for i, x in enumerate(leaves)})
    tmp.replace(path)  # atomic: a run killed mid-save keeps the previous checkpoint


def _load_checkpoint(path: Path, heads, opt_state):
    import jax
    import jax.numpy as jnp

    z = np.load(path)
    leaves, treedef = jax.tree.flatten((heads, opt_state))
    if len(z.files) - 1 != len(leaves):
        raise ValueError(f"{path} holds {len(z.files) - 1} arrays, this run has {len(leaves)}: different settings?")
    new = [jnp.asarray(z[f"l{i}"], dtype=leaves[i].dtype) for i in range(len(leaves))]
    heads, opt_state = jax.tree.unflatten(treedef, new)
    return heads, opt_state, int(z["step"])


def train(args) -> dict:
    import jax
    import jax.numpy as jnp
    import optax
    from tqdm import tqdm

    from flashit_jax.data import load_documents
    from flashit_jax.decoding.medusa import init_heads, make_train_step, save_heads
    from flashit_jax.errors import FlashitError
    from flashit_jax.loading import load_model, load_tokenizer

    loaded = load_model(args.model, args.dtype)
    tok = load_tokenizer(args.tokenizer) if args.tokenizer else loaded.tokenizer
    if tok is None:
        raise FlashitError(f"{args.model} has no tokenizer; pass --tokenizer")
    rows, valid = token_rows(tok, load_documents(args.data, "train"), args.seq_len)
    if len(rows) < args.batch:
        raise FlashitError(f"{args.data}: {len(rows)} rows of {args.seq_len} tokens, fewer than one batch")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sched = optax.warmup_cosine_decay_schedule(0.0, args.lr, min(100, args.steps // 10 + 1), args.steps,
                                               args.lr * 0.1)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=args.weight_decay))
    heads = init_heads(loaded.config, args.heads, jax.random.key(args.seed), own_head=args.own_head,
                       dtype=jnp.float32, base_params=loaded.params)
    opt_state = optimizer.init(heads)
    start = 0
    ckpt = out / "checkpoint.npz"
    if ckpt.exists() and not args.restart:
        heads, opt_state, start = _load_checkpoint(ckpt, heads, opt_state)
        print(f"resumed from {ckpt} at step {start}")
    step_fn = make_train_step(loaded.model, optimizer, decay=args.decay, labels=args.labels)
    rng_rows = len(rows)
    log = []
    t0 = time.perf_counter()
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="medusa heads")
    for step in bar:
        epoch, i = divmod(step * args.batch, rng_rows)
        perm = np.random.default_rng(args.seed + epoch).permutation(rng_rows)
        idx = perm[np.arange(i, i + args.batch) % rng_rows]
        toks, val = jnp.asarray(rows[idx]), jnp.asarray(valid[idx])
        heads, opt_state, loss, accs = step_fn(heads, opt_state, loaded.params, toks, val)
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            rec = {"step": step + 1, "loss": float(loss), "top1": [round(float(a), 4) for a in accs]}
            log.append(rec)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", top1=",".join(f"{a:.2f}" for a in rec["top1"]))
        if (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            _save_checkpoint(ckpt, heads, opt_state, step + 1)
    meta = {"base": loaded.source, "steps": args.steps, "labels": args.labels, "seq_len": args.seq_len,
            "batch": args.batch, "lr": args.lr, "data": args.data, "log": log,
            "train_s": round(time.perf_counter() - t0, 1)}
    save_heads(out, heads, meta)
    _save_checkpoint(ckpt, heads, opt_state, args.steps)
    print(json.dumps({k: v for k, v in meta.items() if k != "log"} | {"last": log[-1] if log else None}))
    return meta


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m train.medusa", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--data", default="bundled", help="a flashit_jax.data.load_documents spec (train split)")
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--own-head", action="store_true", help="a [dim, vocab] output layer per head (Medusa-1)")
    ap.add_argument("--labels", choices=["base", "data"], default="base")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--decay", type=float, default=0.8, help="loss weight decay^k of head k")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--save-every", type=int, default=100)
    ap.add_argument("--restart", action="store_true", help="ignore an existing checkpoint")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    from flashit_jax.errors import FlashitError, user_errors

    with user_errors("train.medusa"):
        if args.heads < 1 or args.steps < 1 or args.batch < 1 or args.seq_len < 4:
            raise FlashitError("--heads, --steps and --batch must be >= 1 and --seq-len >= 4")
        try:
            return train(args)
        except ValueError as e:
            if "checkpoint" in str(e) or ".npz" in str(e):
                raise FlashitError(str(e)) from None
            raise


if __name__ == "__main__":
    main()

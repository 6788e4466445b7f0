"""The training loop shared by `train.distill` and `train.finetune`.

    task = Task(student_model, student_params, tokenizer, objective, teacher_model, teacher_params)
    summary = run(cfg, task)

Per step: the global batch of that step (a pure function of seed and step, so resuming needs
only the step), placed on the mesh by the batch rule; one jitted step (parameters, optimizer
state and teacher sharded by the family's logical-axis rules); metrics to OUT/metrics.jsonl;
checkpoints every `ckpt_every` steps (async, keep-last-K); perplexity on held-out documents
every `eval_every` steps; the final model to OUT/model (loadable by eval.perplexity), with a
record of the training appended to its transforms; a loss-curve plot OUT/curves.png.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from flashit_jax import sharding as shd
from flashit_jax.errors import FlashitError
from train.checkpoint import Checkpointer, check_run_dir, run_identity, write_run_config
from train.config import TrainConfig, to_json
from train.data import TokenRows, load_rows
from train.optim import make_optimizer, schedule
from train.step import Objective, cast_floats, init_state, make_token_loss, make_train_step


@dataclasses.dataclass
class Task:
    student_model: object
    student_params: dict  # fp32 master weights (the shared teacher arrays are fine: never mutated)
    tokenizer: object
    objective: Objective
    teacher_model: object = None
    teacher_params: dict | None = None
    extra_trainable: dict = dataclasses.field(default_factory=dict)  # e.g. {"proj": ...} (not saved)
    transforms: list = dataclasses.field(default_factory=list)  # the base model's transforms
    record: dict = dataclasses.field(default_factory=dict)  # appended to transforms in the saved model
    prepare_save: object = None  # params -> params to save (QAT: the quantized grid); (params, frozen) -> ... with frozen_params
    # Partial training (LoRA): student_params are the trained part only, frozen_params the rest (an input
    # of every step, never differentiated, not checkpointed), combine(trained, frozen) -> model params.
    frozen_params: dict | None = None
    combine: object = None
    masks: dict | None = None  # keep-masks (bool, sub-tree of the params) of pruned weights: kept at 0


def init_distributed(cfg: TrainConfig) -> None:
    """Multi-host start; must run before anything touches a device."""
    if cfg.coordinator:
        if cfg.num_processes < 1 or cfg.process_id < 0:
            raise FlashitError("--coordinator needs --num-processes and --process-id")
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes talk through gloo
        jax.distributed.initialize(coordinator_address=cfg.coordinator, num_processes=cfg.num_processes,
                                   process_id=cfg.process_id)
    elif cfg.distributed:
        jax.distributed.initialize()  # TPU pods, SLURM, Open MPI: detected from the environment


def parse_dtype(name: str):
    from flashit_jax.loading import parse_dtype as pd

    return pd(name)


def _is_main() -> bool:
    return jax.process_index() == 0


class _Metrics:
    def __init__(self, path: Path, resume_step: int):
        self.path = path
        if _is_main():
            keep = []
            if resume_step > 0 and path.exists():  # drop what an interrupted run logged past its checkpoint
                keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= resume_step]
            path.write_text("".join(ln + "\n" for ln in keep))

    def write(self, rec: dict) -> None:
        if _is_main():
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def read(self) -> list[dict]:
        return [json.loads(ln) for ln in self.path.read_text().splitlines() if ln.strip()] if self.path.exists() else []


def plot_curves(records: list[dict], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_ppl" in r]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    if train:
        axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.8, label="objective")
        if "ce" in train[0]:
            axes[0].plot([r["step"] for r in train], [r["ce"] for r in train], lw=0.8, label="data CE")
        axes[0].set_xlabel("step"), axes[0].set_ylabel("training loss"), axes[0].legend()
    if evals:
        axes[1].plot([r["step"] for r in evals], [r["eval_ppl"] for r in evals], "o-")
        axes[1].set_xlabel("step"), axes[1].set_ylabel("held-out perplexity"), axes[1].set_yscale("log")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _topk_fn(teacher_model, k: int, attn_impl: str, doc_masking: bool):
    @jax.jit
    def topk(params, batch):
        if doc_masking:
            logits, _, _ = teacher_model.forward(params, batch["tokens"], batch["positions"],
                                                 segment_ids=batch["segment_ids"], attn_impl=attn_impl)
        else:
            logits, _, _ = teacher_model.forward(params, batch["tokens"], attn_impl=attn_impl)
        return jax.lax.top_k(logits, k)

    return topk


def _eval_docs(cfg: TrainConfig):
    from flashit_jax.data import load_documents

    return load_documents(cfg.eval_data or cfg.data, cfg.eval_split)


def model_params(task: Task, params, frozen=None):
    """The model the run has trained so far, as evaluated and saved."""
    if task.frozen_params is not None:
        return task.prepare_save(params, frozen)
    return task.prepare_save(params) if task.prepare_save else params


def evaluate(task: Task, params, docs, cfg: TrainConfig, max_chunks: int | None, frozen=None) -> dict:
    from eval.perplexity import evaluate as ppl

    mp = model_params(task, params, frozen)
    rep = ppl(task.student_model, mp, task.tokenizer, docs, ctx=cfg.eval_ctx, protocol="llamacpp",
              max_chunks=max_chunks, progress=False, attn_impl=cfg.attn_impl)
    return {"eval_ppl": rep["ppl"], "eval_nll": rep["mean_nll"], "eval_chunks": rep["n_chunks"]}


def _trained_state(state):
    """What a checkpoint holds: the state without the frozen base (the task rebuilds it)."""
    return {k: v for k, v in state.items() if k != "frozen"}


def build_state(model, params, extra_trainable: dict, optimizer, mesh, seed: int, masks=None, frozen=None):
    """The train state with fp32 master weights, placed by the family's sharding rules (extra
    trainables, e.g. feature projections, replicated; `masks` of pruned weights sharded like
    them; `frozen`, a frozen part of the model, as it is). Returns (state, its shardings)."""
    import optax

    trainable = {"model": cast_floats(params, jnp.float32), **extra_trainable}
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    p_sh = {"model": shd.param_shardings(trainable["model"], mesh, shd.family_axes(model)),
            **jax.tree.map(lambda _: replicated, extra_trainable)}
    abstract_opt = jax.eval_shape(optimizer.init, jax.eval_shape(lambda: trainable))
    # optimizer moments follow their parameters' shardings; counters and the like are replicated
    o_sh = optax.tree_map_params(optimizer, lambda _, s: s, abstract_opt, p_sh,
                                 transform_non_params=lambda _: replicated,
                                 is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    state_sh = {"step": replicated, "params": p_sh, "opt_state": o_sh, "rng": replicated}
    if masks is not None:
        state_sh["masks"] = shd.param_shardings(masks, mesh, shd.family_axes(model))
    state = jax.jit(lambda t, m: init_state(t, optimizer, seed, m), out_shardings=state_sh)(trainable, masks)
    if frozen is not None:
        f_sh = shd.param_shardings(frozen, mesh, shd.family_axes(model))
        # a copy: the step donates the state, and the caller's arrays must survive that
        state["frozen"] = jax.jit(lambda f: jax.tree.map(jnp.copy, f), out_shardings=f_sh)(frozen)
        state_sh["frozen"] = f_sh
    return state, state_sh


TEACHER_SHARDINGS = ("auto", "fsdp", "replicated")


def teacher_replicated(params, mesh, dtype, how: str = "auto") -> bool:
    """Whether the frozen teacher gets a full copy per device. `auto`: when the mesh splits
    parameters (fsdp/tensor > 1) and the teacher in `dtype` takes at most 1/16 of a device's
    memory: then gathering its weights every step (fsdp) costs step time and saves little
    (2 H200s, 326M teacher: fsdp scaling 89.6% with it split). Memory unknown (CPU): split."""
    if how not in TEACHER_SHARDINGS:
        raise FlashitError(f"teacher_sharding must be one of {', '.join(TEACHER_SHARDINGS)}, got {how!r}")
    if how != "auto":
        return how == "replicated"
    if mesh.shape.get("fsdp", 1) * mesh.shape.get("tensor", 1) == 1:
        return False  # nothing is split: the rules give the same placement
    stats = mesh.devices.flat[0].memory_stats() or {}
    limit = stats.get("bytes_limit", 0)
    size = sum(x.size * jnp.dtype(dtype).itemsize for x in jax.tree.leaves(params)
               if jnp.issubdtype(x.dtype, jnp.floating))
    return bool(limit) and size * 16 <= limit


def place_teacher(model, params, mesh, dtype, how: str = "auto"):
    """Teacher weights in `dtype`, sharded by its family's rules or replicated (`how`, see
    `teacher_replicated`). Returns (params, shardings)."""
    if teacher_replicated(params, mesh, dtype, how):
        rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        t_sh = jax.tree.map(lambda _: rep, params)
    else:
        t_sh = shd.param_shardings(params, mesh, shd.family_axes(model))
    return jax.jit(lambda p: cast_floats(p, dtype), out_shardings=t_sh)(params), t_sh


def compile_step(token_loss, optimizer, mesh, state_sh, teacher_sh, batch_keys, accum_steps: int = 1):
    """The jitted step: state donated, batch split over the mesh's batch axes."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    inner = make_train_step(token_loss, optimizer, accum_steps, lambda nd: shd.batch_sharding(mesh, nd))

    def step_fn(*args):
        # traced under the mesh: `auto` kernel choices take partitionable ops on a split mesh, and
        # cuDNN attention gets the one q/k/v placement its partitioner accepts (kernels/attention)
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return inner(*args)

    b_sh = {k: shd.batch_sharding(mesh, 3 if k.startswith("topk") else 2) for k in batch_keys}
    return jax.jit(step_fn, in_shardings=(state_sh, teacher_sh, b_sh), out_shardings=(state_sh, replicated),
                   donate_argnums=(0,))


def run(cfg: TrainConfig, task: Task, *, prog: str = "train") -> dict:
    from tqdm.auto import tqdm

    from flashit_jax.loading import cache_dir, save_model

    obj = task.objective
    out = Path(cfg.out)
    if cfg.steps < 1:
        raise FlashitError(f"steps must be >= 1, got {cfg.steps}")
    if cfg.batch_size < 1 or cfg.accum_steps < 1 or cfg.batch_size % cfg.accum_steps:
        raise FlashitError(f"batch_size ({cfg.batch_size}) must be a positive multiple of accum_steps ({cfg.accum_steps})")
    # ---- everything that can fail on bad input fails before anything is written
    if cfg.attn_impl == "cudnn" and cfg.doc_masking:
        raise FlashitError("cuDNN attention has no segment (document) masking: add --doc-masking false "
                           "(packed documents then attend to each other, as in GPT-2/nanoGPT) or use another --attn-impl")
    mesh = shd.make_mesh(cfg.mesh_data, cfg.mesh_fsdp, cfg.mesh_tensor)
    n_shards = shd.batch_shards(mesh)
    if (cfg.batch_size // cfg.accum_steps) % n_shards:
        raise FlashitError(f"micro-batch {cfg.batch_size // cfg.accum_steps} is not a multiple of the {n_shards} "
                           f"batch shards of the mesh {dict(mesh.shape)}")
    rows = load_rows(cfg.data, cfg.split, task.tokenizer, cfg.seq_len, cfg.data_seed, cache_dir() / "packed")
    eval_docs = _eval_docs(cfg) if jax.process_count() == 1 else None
    identity = run_identity(cfg, {"data_fingerprint": rows.fingerprint, **{f"task_{k}": v for k, v in task.record.items()
                                                                          if isinstance(v, (str, int, float, list))}})
    resuming = check_run_dir(out, identity)
    if _is_main():
        write_run_config(out, identity)
        (out / "train_config.json").write_text(to_json(cfg))

    # ---- state on the mesh
    compute_dtype = parse_dtype(cfg.compute_dtype)
    optimizer = make_optimizer(cfg)
    state, state_sh = build_state(task.student_model, task.student_params, task.extra_trainable, optimizer, mesh,
                                  cfg.seed, task.masks, frozen=task.frozen_params)
    if _is_main():
        (out / "sharding.txt").write_text(f"mesh {dict(mesh.shape)} over {jax.device_count()} devices, "
                                          f"{jax.process_count()} processes\n"
                                          + shd.describe(state["params"], state_sh["params"]) + "\n")
    teacher_params, t_sh = None, None
    if obj.needs_teacher:
        teacher_params, t_sh = place_teacher(task.teacher_model, task.teacher_params, mesh,
                                             parse_dtype(cfg.teacher_dtype or cfg.compute_dtype),
                                             cfg.teacher_sharding)

    ckpt = Checkpointer(out / "ckpt", every=cfg.ckpt_every, keep=cfg.keep_checkpoints,
                        async_save=cfg.async_checkpoints) if cfg.ckpt_every > 0 else None
    start = 0
    if resuming and ckpt is not None and ckpt.latest_step() is not None:
        restored, meta = ckpt.restore(ckpt.latest_step(), _trained_state(state))
        state = {**state, **restored}
        start = int(jax.device_get(state["step"]))
        if meta.get("data_fingerprint") != rows.fingerprint:
            raise FlashitError(f"{out}: checkpoint was trained on other data rows ({meta.get('data_fingerprint')} vs "
                               f"{rows.fingerprint})")
        if _is_main():
            print(f"{prog}: resuming {out} from step {start} (data position: row {meta.get('data_position')})")
    metrics = _Metrics(out / "metrics.jsonl", start)

    # ---- teacher top-k cache (sparse KD)
    topk = None
    if obj.needs_topk:
        from train import topk_cache

        if jax.process_count() > 1:
            raise FlashitError("building the top-k cache runs in one process; build it first, then train")
        path = Path(cfg.topk_cache) if cfg.topk_cache else out / "topk"
        topk = topk_cache.TopKCache.open_or_create(
            path, n_rows=rows.n_rows, seq_len=rows.seq_len, k=cfg.topk,
            meta={"teacher": task.record.get("teacher", ""), "data_fingerprint": rows.fingerprint,
                  "teacher_dtype": cfg.teacher_dtype or cfg.compute_dtype, "doc_masking": cfg.doc_masking})
        # only the rows this run will read (the cache fills up further if a later run needs more)
        n_read = cfg.steps * cfg.batch_size
        needed = np.arange(rows.n_rows) if n_read >= rows.n_rows else np.unique(rows.stream_ids(0, n_read))
        if len(np.intersect1d(topk.missing_rows(), needed)):
            tp = cast_floats(task.teacher_params, parse_dtype(cfg.teacher_dtype or cfg.compute_dtype))
            fn = _topk_fn(task.teacher_model, cfg.topk, cfg.attn_impl, cfg.doc_masking)
            topk_cache.build(topk, lambda b: fn(tp, {k: jnp.asarray(v) for k, v in b.items()}), rows,
                             batch_size=max(1, cfg.batch_size // cfg.accum_steps), progress=cfg.progress and _is_main(),
                             only=needed)

    # ---- the step
    token_loss = make_token_loss(obj, task.student_model, task.teacher_model, compute_dtype=compute_dtype,
                                 attn_impl=cfg.attn_impl, doc_masking=cfg.doc_masking, combine=task.combine)
    batch_keys = ["tokens", "targets", "segment_ids", "positions", "loss_mask"] + (
        ["topk_values", "topk_indices"] if topk is not None else [])
    jstep = compile_step(token_loss, optimizer, mesh, state_sh, t_sh, batch_keys, cfg.accum_steps)
    local_rows = shd.process_batch_slice(cfg.batch_size, mesh)
    lr_at = schedule(cfg)

    def batch_for(step: int):
        ids = rows.row_ids(step, cfg.batch_size)[local_rows]
        b = rows.rows(ids)
        if topk is not None:
            b["topk_values"], b["topk_indices"] = topk.read(ids)
        return shd.shard_batch({k: b[k] for k in batch_keys}, mesh, local=True)

    def do_eval(step, max_chunks):
        if eval_docs is None:
            return None
        rec = {"step": step, **evaluate(task, state["params"]["model"], eval_docs, cfg, max_chunks,
                                        state.get("frozen"))}
        metrics.write(rec)
        return rec

    def save_ckpt(step, force=False):
        if ckpt is not None:
            ckpt.save(step, _trained_state(state), {"step": step, "data_position": step * cfg.batch_size,
                                    "data_fingerprint": rows.fingerprint, "seed": cfg.seed}, force=force)

    records_pending: list = []
    t0 = time.perf_counter()
    tok_window, t_window = 0.0, time.perf_counter()
    eval_chunks = cfg.eval_max_chunks if cfg.eval_max_chunks > 0 else None
    if start == 0 and cfg.eval_every > 0:
        do_eval(0, eval_chunks)
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=prog, unit="step",
               disable=not (cfg.progress and _is_main()))
    last = None

    def flush():
        nonlocal records_pending, tok_window, t_window, last
        fetched = jax.device_get([m for _, m in records_pending])
        now = time.perf_counter()
        for (s, _), m in zip(records_pending, fetched):
            tok_window += float(m["tokens"])
            last = {"step": s, **{k: float(v) for k, v in m.items()}, "lr": float(lr_at(s - 1)),
                    "time_s": round(now - t0, 3)}
            metrics.write(last)
        tps = tok_window / max(now - t_window, 1e-9)
        tok_window, t_window, records_pending = 0.0, now, []
        bar.set_postfix(loss=f"{last['loss']:.4f}", **({"ce": f"{last['ce']:.4f}"} if "ce" in last else {}),
                        tok_s=f"{tps:.0f}")

    for step in bar:
        state, mets = jstep(state, teacher_params, batch_for(step))
        records_pending.append((step + 1, mets))
        done = step + 1
        save_now = ckpt is not None and (done % cfg.ckpt_every == 0 or done == cfg.steps)
        if done % cfg.log_every == 0 or done == cfg.steps or save_now:
            flush()  # before a checkpoint too: every checkpointed step has its metrics on disk
        if save_now:
            save_ckpt(done, force=True)
        if cfg.eval_every > 0 and done % cfg.eval_every == 0 and done != cfg.steps:
            rec = do_eval(done, eval_chunks)
            if rec:
                bar.write(f"step {done}: held-out ppl {rec['eval_ppl']:.3f}")
    bar.close()
    if ckpt is not None:
        ckpt.wait()

    summary = {"steps": cfg.steps, "wall_s": time.perf_counter() - t0, "resumed_from": start}
    final_chunks = {0: eval_chunks, -1: None}.get(cfg.final_eval_max_chunks, cfg.final_eval_max_chunks)
    final = do_eval(cfg.steps, final_chunks)
    if final:
        summary.update(final)
        print(f"{prog}: step {cfg.steps}: held-out ppl {final['eval_ppl']:.4f} ({final['eval_chunks']} chunks of "
              f"{cfg.eval_ctx} tokens, {cfg.eval_data or cfg.data}:{cfg.eval_split})")
    if last is not None:
        summary["final_loss"] = last["loss"]
    if _is_main():
        plot_curves(metrics.read(), out / "curves.png", f"{prog} {task.record.get('loss', '')} {out.name}")
    if cfg.save_model:
        params = state["params"]["model"]
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            params = multihost_utils.process_allgather(params, tiled=True)
        params = jax.device_get(params)
        if task.prepare_save:
            params = jax.device_get(model_params(task, params, state.get("frozen")))
        if _is_main():
            record = {**task.record, "steps": cfg.steps, "batch_size": cfg.batch_size, "seq_len": cfg.seq_len,
                      "data": cfg.data, "split": cfg.split, "date": datetime.date.today().isoformat(),
                      **({"eval_ppl": final["eval_ppl"], "eval_ctx": cfg.eval_ctx} if final else {})}
            save_model(out / "model", task.student_model.config, params, tokenizer=task.tokenizer,
                       transforms=[*task.transforms, record])
            summary["model"] = str(out / "model")
    if ckpt is not None:
        ckpt.close()
    if _is_main():
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    summary["state"] = state
    return summary


__all__ = ["Task", "run", "init_distributed", "build_state", "place_teacher", "compile_step", "plot_curves",
           "evaluate", "TokenRows"]

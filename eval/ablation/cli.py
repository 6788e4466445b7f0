"""`python -m eval.ablation`: every acceleration level, alone and stacked, measured for quality and
speed on the same hardware, with peer platforms beside them.

    python -m eval.ablation                                   # --quick on smollm2-135m, bundled data
    python -m eval.ablation --full --student out/student --hybrid out/hybrid
    python -m eval.ablation --levels baseline,w8,w4-gptq+wanda-50+lookup --out out/my_ablation
    python -m eval.ablation --accelerator --quality-from docs/ablation.json   # on a GPU/TPU

Modes
- default: real weights; quality (perplexity, llama.cpp protocol) and speed on this device.
  On a CPU the speed columns are marked indicative and the kernels level is skipped.
- --accelerator: speed only, with random weights in each level's shapes and formats (a
  calibrated level runs its calibration-free twin: GPTQ -> RTN of the same format, Wanda ->
  magnitude of the same sparsity); decoding levels, whose speed depends on acceptance, take
  their tokens per target pass from the quality json (real weights on CPU) and their round
  time from this device, unless --real-model gives weights here. Quality cells come from the
  json, and each cell names the device it came from.

Levels (join with '+' to stack): baseline, kernels, w8, w4, w4-gptq, w4-awq, w8a8, smoothquant,
fp8, kv-int8, magnitude-50, wanda-50, sparsegpt-50, magnitude-2:4, 2:4, online-50, lookup,
speculative, medusa (--medusa DIR), student (--student DIR), hybrid (--hybrid DIR),
quant:RECIPE, prune:RECIPE. A level whose code is not in this checkout, or whose directory was
not given, is reported as unavailable in its row; a level that fails is reported as failed and
the others still run. Results are kept per row in the json: a rerun with the same settings skips
finished rows (--fresh recomputes, --redo ROW,... recomputes some).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import time
import traceback
from pathlib import Path

import numpy as np

from flashit_jax.errors import FlashitError, user_errors

QUICK_SETTINGS = dict(chunks_per_doc=3, calib_seqs=8, calib_len=512, prompt_len=128, new_tokens=64, prefill_batch=4)
FULL_SETTINGS = dict(chunks_per_doc=12, calib_seqs=32, calib_len=512, prompt_len=256, new_tokens=256, prefill_batch=8)
ROW_ARGS = ("student", "hybrid", "medusa", "draft", "draft_layers")


@dataclasses.dataclass
class Env:
    """What the level adapters may ask for (see levels.py)."""

    platform: str
    dtype: str
    progress: bool
    calib_docs: list
    calib_seqs: int
    calib_len: int
    random_weights: bool = False
    student: str | None = None
    hybrid: str | None = None
    medusa: str | None = None
    draft: str | None = None
    draft_layers: str = "::2"
    lookup_gamma: int = 8
    spec_gamma: int = 4
    _calib: dict = dataclasses.field(default_factory=dict)

    def calibration_tokens(self, model) -> np.ndarray:
        if self.random_weights:
            rng = np.random.default_rng(0)
            return rng.integers(0, model.config.vocab_size, (self.calib_seqs, self.calib_len)).astype(np.int32)
        from flashit_jax.quant import calibration_tokens

        return calibration_tokens(self.tokenizer, self.calib_docs, n_seqs=self.calib_seqs, seq_len=self.calib_len)

    def calibration(self, model, params):
        """Input statistics of `params` (cached per parameter tree: stacked levels calibrate the
        model they transform, e.g. GPTQ after pruning sees the pruned model's inputs)."""
        from flashit_jax.quant import calibrate

        key = id(params)
        if key not in self._calib:
            self._calib.clear()  # one set of Hessians at a time
            self._calib[key] = (params, calibrate(model, params, self.calibration_tokens(model),
                                                  progress=self.progress))
        return self._calib[key][1]


def commit() -> str:
    if os.environ.get("FLASHIT_JAX_COMMIT"):
        return os.environ["FLASHIT_JAX_COMMIT"]
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def size_mb(params) -> float:
    """Model size: packed weights (QArray) as stored, every other array leaf with floats counted
    as bf16 (as `eval.quant_table`), so rows of different compute dtypes compare."""
    import jax
    import jax.numpy as jnp

    from flashit_jax import tree
    from flashit_jax.nn.qarray import QArray

    total = 0
    for leaf in tree.flatten(params).values():
        if isinstance(leaf, QArray):
            total += leaf.nbytes
            continue
        for a in jax.tree.leaves(leaf):
            item = 2 if jnp.issubdtype(a.dtype, jnp.floating) else jnp.dtype(a.dtype).itemsize
            total += int(np.prod(a.shape)) * item
    return total / 1e6


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime + c.ru_utime + c.ru_stime


def _eval_batch(n_chunks: int) -> int:
    return max(d for d in range(1, 9) if n_chunks % d == 0)


def _random_base(spec: str, dtype: str):
    """Random weights in the shapes of `spec` (accelerator mode)."""
    from eval.ablation.levels import random_like

    return random_like(spec, dtype)


class Runner:
    def __init__(self, args, settings: dict, state: dict, state_path: Path):
        self.args, self.s, self.state, self.path = args, settings, state, state_path
        self.rows = state["rows"]
        self.errlog = state_path.with_suffix(".errors.log")

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.state, indent=1))

    def done(self, name: str) -> bool:
        r = self.rows.get(name)
        if r is None or r.get("status") not in ("ok", "skipped"):
            return False
        levels = set(name.split("+"))
        used = [k for k in ROW_ARGS if k in levels or (k.startswith("draft") and "speculative" in levels)]
        return all(r.get("args", {}).get(k) == getattr(self.args, k) for k in used)

    def record(self, name: str, row: dict, t0: float, c0: float) -> None:
        from eval.common import device_info

        info = device_info()
        row.update(seconds=time.perf_counter() - t0, cpu_seconds=_cpu_s() - c0, date=info["date"],
                   commit=self.state["commit"], args={k: getattr(self.args, k) for k in ROW_ARGS})
        self.rows[name] = row
        self.save()

    def fail(self, name: str, e: BaseException, t0: float, c0: float, what: str = "") -> None:
        msg = str(e) if isinstance(e, FlashitError) else f"{type(e).__name__}: {e}"
        msg = msg.strip().splitlines()[0][:300] if msg.strip() else type(e).__name__
        with open(self.errlog, "a") as f:
            f.write(f"--- {name} ({time.strftime('%Y-%m-%d %H:%M:%S')})\n{traceback.format_exc()}\n")
        self.record(name, {"status": "failed", "note": msg, "what": what}, t0, c0)
        print(f"{name}: FAILED: {msg} (traceback in {self.errlog})", flush=True)


def run(args) -> dict:
    import jax
    from tqdm.auto import tqdm

    from eval.ablation import levels as L
    from eval.ablation import measure, peers
    from eval.common import device_info, setup_jax
    from flashit_jax.data import load_documents
    from flashit_jax.loading import load_model, load_tokenizer

    setup_jax()
    platform = jax.default_backend()
    rows_wanted = [r.strip() for r in args.levels.split(",") if r.strip()] if args.levels else \
        list(L.FULL if args.full else L.QUICK)
    for extra, flag in (("student", args.student), ("hybrid", args.hybrid), ("medusa", args.medusa)):
        if flag and extra not in rows_wanted:
            rows_wanted.append(extra)
    if "baseline" not in rows_wanted:
        rows_wanted.insert(0, "baseline")
    order = []
    for r in rows_wanted:  # fail on an unknown level name before loading anything
        c = L.canonical(r)
        if c not in order:
            order.append(c)
    peer_names = [] if args.no_peers else [p.strip() for p in args.peers.split(",") if p.strip()]
    for p in peer_names:
        if p not in peers.PEERS:
            raise FlashitError(f"unknown peer {p!r}; known: {', '.join(peers.PEERS)}")
    preset = FULL_SETTINGS if args.full else QUICK_SETTINGS
    over = {k: getattr(args, k) for k in preset if getattr(args, k) is not None}
    speed_dtype = args.speed_dtype or ("fp32" if platform == "cpu" else "bf16")
    mode = "accelerator" if args.accelerator else "measure"
    settings = {"mode": mode, "model": args.model, "data": args.data, "split": args.split, "ctx": args.ctx,
                "protocol": "llamacpp", **preset, **over, "speed_dtype": speed_dtype,
                "lookup_gamma": args.lookup_gamma, "spec_gamma": args.spec_gamma}
    docs = load_documents(args.data, args.split)
    t_load = time.perf_counter()
    if args.accelerator:
        base_loaded = _random_base(args.model, speed_dtype)
        tokenizer = base_loaded.tokenizer
    else:
        base_loaded = load_model(args.model, "fp32" if platform == "cpu" else speed_dtype)
        tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else base_loaded.tokenizer
        if tokenizer is None:
            raise FlashitError(f"{args.model} has no tokenizer; pass --tokenizer")
    print(f"model {args.model}: {base_loaded.note or base_loaded.source} ({time.perf_counter() - t_load:.0f} s)",
          flush=True)
    if tokenizer is not None:
        chunks, _ = peers.chunks_of(tokenizer, docs, {**settings, "eval_batch": 1})
        settings["eval_batch"] = _eval_batch(len(chunks))
    else:
        settings["eval_batch"] = 1
    state_path = Path(args.json or Path(args.out) / "ablation.json")
    state = json.loads(state_path.read_text()) if state_path.exists() and not args.fresh else {}
    if state.get("settings") != settings:
        if state:
            print(f"{state_path}: other settings; starting afresh", flush=True)
        state = {"settings": settings, "rows": {}}
    info = device_info()
    state.update(device=info["device"], date=info["date"], jax_version=info["jax_version"], commit=commit(),
                 command="python -m eval.ablation " + " ".join(args.argv))
    for r in (args.redo or "").split(","):
        if r.strip():
            state["rows"].pop(L.canonical(r) if not r.startswith("peer:") else r.strip(), None)
    state["order"] = order + [f"peer:{p}" for p in peer_names]  # up front: a run cut off still renders
    runner = Runner(args, settings, state, state_path)

    quality_src = None
    if args.accelerator:
        qpath = Path(args.quality_from) if args.quality_from else None
        if qpath and qpath.exists():
            quality_src = json.loads(qpath.read_text())
            if quality_src.get("commit", "").split("-")[0] != state["commit"].split("-")[0]:
                print(f"note: quality json {qpath} is from commit {quality_src.get('commit')}, this is "
                      f"{state['commit']}", flush=True)
        else:
            print("note: no --quality-from json; quality cells stay empty", flush=True)

    env = Env(platform=platform, dtype=speed_dtype if args.accelerator or platform != "cpu" else "fp32",
              progress=not args.no_progress, calib_docs=load_documents(args.data, "train"),
              calib_seqs=settings["calib_seqs"], calib_len=settings["calib_len"], random_weights=args.accelerator,
              student=args.student, hybrid=args.hybrid, medusa=args.medusa, draft=args.draft,
              draft_layers=args.draft_layers, lookup_gamma=args.lookup_gamma, spec_gamma=args.spec_gamma)
    env.tokenizer = tokenizer

    rng = np.random.default_rng(0)
    vocab = base_loaded.config.vocab_size
    if tokenizer is not None and not args.accelerator:
        text_toks = tokenizer.encode(docs[0].text)
        prompt = text_toks[: settings["prompt_len"]]
        windows = [tokenizer.encode(d.text) for d in docs]
        pre = [w[i * settings["prompt_len"]:(i + 1) * settings["prompt_len"]] for w in windows for i in range(1, 64)]
        pre = [p for p in pre if len(p) == settings["prompt_len"]][: settings["prefill_batch"]]
        prefill_tokens = np.asarray(pre, np.int32)
        if len(prefill_tokens) < settings["prefill_batch"]:
            prefill_tokens = rng.integers(0, vocab, (settings["prefill_batch"], settings["prompt_len"])).astype(np.int32)
    else:
        prompt = rng.integers(0, vocab, settings["prompt_len"]).tolist()
        prefill_tokens = rng.integers(0, vocab, (settings["prefill_batch"], settings["prompt_len"])).astype(np.int32)
    bw_bytes = (256 << 20) if platform == "cpu" else (1 << 30)
    if "copy_bandwidth" not in state or state.get("device") != info["device"]:
        state["copy_bandwidth"] = measure.copy_bandwidth(bw_bytes)
    bandwidth = state["copy_bandwidth"]
    print(f"copy bandwidth (read + write) {bandwidth / 1e9:.1f} GB/s on {info['device']}", flush=True)

    base = L.Built(base_loaded.model, base_loaded.params, tokenizer)
    real = None
    if args.accelerator and args.real_model:
        r = load_model(args.real_model, speed_dtype)
        real = L.Built(r.model, r.params, r.tokenizer or tokenizer)
    indicative = platform == "cpu"
    speed_device = info["device"]

    for name in tqdm(order, desc="ablation", unit="level", disable=args.no_progress):
        if runner.done(name):
            print(f"{name}: done before ({runner.rows[name]['status']}); --redo {name} recomputes", flush=True)
            continue
        t0, c0 = time.perf_counter(), _cpu_s()
        stack = L.parse_stack(name)
        what = " + ".join(lv.what for lv in stack)
        cannot = L.unavailable(stack, env)
        if cannot:
            status, why = cannot
            runner.record(name, {"status": status, "note": why, "what": what}, t0, c0)
            print(f"{name}: {status}: {why}", flush=True)
            continue
        measure.reset_executables()
        try:
            with tqdm(total=3, desc=f"  {name}", unit="phase", leave=False, disable=args.no_progress) as bar:
                bar.set_postfix_str("build")
                use_real = real is not None and any(lv.real_weights_for_speed for lv in stack)
                built = L.build(stack, real if use_real else base, env,
                                speed_twins=args.accelerator and not use_real)
                bar.update()
                row = {"status": "ok", "what": what, "size_mb": size_mb(built.params),
                       "speed_device": speed_device, "speed_indicative": indicative}
                bar.set_postfix_str("quality")
                if args.accelerator:
                    row.update(_quality_from(quality_src, name))
                else:
                    row.update(_quality(name, stack, built, docs, settings, runner, env, L, measure))
                    row["quality_device"] = speed_device
                bar.update()
                bar.set_postfix_str("speed")
                sp = measure.speed(built, prompt=prompt, prefill_tokens=prefill_tokens,
                                   new_tokens=settings["new_tokens"], bandwidth=bandwidth)
                row.update(sp)
                if args.accelerator and built.decoding is not None and not use_real:
                    _acceptance_from_quality(row, quality_src, name)
                bar.update()
            if built.notes:
                row["note"] = "; ".join(dict.fromkeys(built.notes))
            runner.record(name, row, t0, c0)
            ppl = f"ppl {row['ppl']:.3f}" if row.get("ppl") is not None else "ppl —"
            print(f"{name}: {ppl}, decode {row['decode_tps']:.1f} tok/s, prefill {row['prefill_tps']:.0f} tok/s "
                  f"({row['seconds']:.0f} s, cpu {row['cpu_seconds']:.0f} s)", flush=True)
        except Exception as e:  # noqa: BLE001 - a failing level is reported in its row
            runner.fail(name, e, t0, c0, what)
        finally:
            built = None

    base_row = runner.rows.get("baseline", {})
    for p in peer_names:
        name = f"peer:{p}"
        if runner.done(name):
            print(f"{name}: done before; --redo {name} recomputes", flush=True)
            continue
        t0, c0 = time.perf_counter(), _cpu_s()
        try:
            kw = dict(prompt=prompt, prefill_tokens=prefill_tokens, new_tokens=settings["new_tokens"],
                      bandwidth=bandwidth, quality=not args.accelerator)
            print(f"{name}: running", flush=True)
            if p == "hf-static":
                row = peers.hf_row(base_loaded, docs, settings, **kw)
            else:
                row = peers.llamacpp_row(args.model, tokenizer, docs, settings, **kw)
            row.update(status="ok", speed_indicative=indicative and "device" not in row)
            row["speed_device"] = row.pop("device", speed_device)
            if args.accelerator:
                row.update({k: v for k, v in _quality_from(quality_src, name).items() if k not in row})
            else:
                row["quality_device"] = speed_device
            if base_row.get("first_tokens") and row.get("first_tokens"):
                same = sum(a == b for a, b in zip(base_row["first_tokens"], row["first_tokens"]))
                row["note"] = f"first 16 greedy tokens: {same}/16 equal to the baseline's"
            runner.record(name, row, t0, c0)
        except ImportError as e:
            runner.record(name, {"status": "unavailable", "note": f"{e}"}, t0, c0)
        except FlashitError as e:
            st = "unavailable" if "not installed" in str(e) else "failed"
            runner.record(name, {"status": st, "note": str(e)}, t0, c0)
            print(f"{name}: {st}: {e}", flush=True)
        except Exception as e:  # noqa: BLE001
            runner.fail(name, e, t0, c0)
    from eval.ablation.report import derive

    derive(state["rows"])  # the json holds the table's Δ% and speedup too
    state["total_seconds"] = sum(r.get("seconds", 0) for r in state["rows"].values())
    state["total_cpu_seconds"] = sum(r.get("cpu_seconds", 0) for r in state["rows"].values())
    runner.save()
    return state


def _quality(name, stack, built, docs, settings, runner, env, L, measure) -> dict:
    qname = "+".join(lv.name for lv in L.quality_stack(stack))
    prev = runner.rows.get(qname)
    if qname != name and prev and prev.get("status") == "ok" and prev.get("ppl") is not None:
        return {k: prev[k] for k in ("ppl", "mean_nll", "n_chunks", "n_scored") if k in prev} | \
            {"quality_note": f"quality of {qname} (decoding keeps the target's outputs)"}
    return measure.quality(built, docs, {**settings, "progress": env.progress})


def _quality_from(src: dict | None, name: str) -> dict:
    if not src:
        return {}
    r = src.get("rows", {}).get(name)
    if not r or r.get("status") != "ok" or r.get("ppl") is None:
        return {}
    return {"ppl": r["ppl"], "mean_nll": r.get("mean_nll"), "n_chunks": r.get("n_chunks"),
            "quality_device": r.get("quality_device", src.get("device")), "quality_date": r.get("date"),
            "quality_commit": r.get("commit")}


def _acceptance_from_quality(row: dict, src: dict | None, name: str) -> None:
    """Decoding levels on random weights: round time from here, tokens per target pass from the
    real-weight run in the quality json."""
    rows = (src or {}).get("rows", {})
    # the Pallas kernels change no token (the quality run is exact, fp32 on CPU, where they are
    # skipped): a stack with them takes the acceptance of the same stack without them
    plain = "+".join(p for p in name.split("+") if p != "kernels")
    src_name = next((n for n in (name, plain) if rows.get(n, {}).get("tokens_per_round")), None)
    r = rows[src_name] if src_name else {}
    tpr = r.get("tokens_per_round")
    if tpr and row.get("round_s"):
        row["decode_tps_random_acceptance"] = row["decode_tps"]
        row["decode_tps"] = tpr / row["round_s"]  # MBU is unchanged: one target pass per round either way
        row["tokens_per_round"] = tpr
        row["note"] = (f"round time on {row['speed_device']} (random weights) x {tpr:.2f} tokens per target pass "
                       f"measured with real weights on {r.get('quality_device', src.get('device'))}"
                       + (f" for {src_name}" if src_name != name else ""))
    else:
        row["note"] = "acceptance of random weights (no real-weight row in the quality json): not meaningful"


def main(argv=None):
    import sys

    ap = argparse.ArgumentParser(prog="python -m eval.ablation", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="known name, random:SHAPE, .gguf, HF or our directory")
    ap.add_argument("--tokenizer", default=None, help="tokenizer source when the model has none")
    ap.add_argument("--data", default="bundled")
    ap.add_argument("--split", default="valid")
    ap.add_argument("--ctx", type=int, default=512)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="the default: 3 chunks per document, 8 x 512 calibration "
                   "tokens, 64 decode tokens, levels " + ",".join(QUICK_LEVELS()))
    g.add_argument("--full", action="store_true", help="12 chunks per document, 32 x 512 calibration tokens, 256 "
                   "decode tokens, more levels and stacks")
    ap.add_argument("--levels", default=None, help="comma-separated rows; a row stacks levels with '+'")
    ap.add_argument("--student", default=None, help="a distilled student directory (adds the student row)")
    ap.add_argument("--hybrid", default=None, help="a Mamba-hybrid directory (adds the hybrid row)")
    ap.add_argument("--medusa", default=None, help="a Medusa heads directory (adds the medusa row)")
    ap.add_argument("--draft", default=None, help="draft model for `speculative` (default: self-speculation)")
    ap.add_argument("--draft-layers", default="::2", help="target layers of the self-speculation draft")
    ap.add_argument("--lookup-gamma", type=int, default=8)
    ap.add_argument("--spec-gamma", type=int, default=4)
    for k in QUICK_SETTINGS:
        ap.add_argument("--" + k.replace("_", "-"), type=int, default=None, help=f"override ({k})")
    ap.add_argument("--speed-dtype", default=None, choices=["fp32", "bf16"],
                    help="default fp32 on CPU (quality and speed on the same weights), bf16 on accelerators")
    ap.add_argument("--peers", default=",".join(("hf-static", "llama.cpp")))
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--accelerator", action="store_true", help="speed with random weights; quality from --quality-from")
    ap.add_argument("--quality-from", default="docs/ablation.json", help="CPU json of the same commit (accelerator mode)")
    ap.add_argument("--real-model", default=None, help="accelerator mode: real weights for the decoding levels")
    ap.add_argument("--out", default="out/ablation", help="folder for ablation.{json,md,png}")
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--fresh", action="store_true", help="recompute every row")
    ap.add_argument("--redo", default=None, help="comma-separated rows to recompute")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    with user_errors("eval.ablation"):
        from eval.ablation import report

        state = run(args)
        out = Path(args.out)
        md_path = Path(args.markdown or out / "ablation.md")
        png_path = Path(args.plot or out / "ablation.png")
        table = report.markdown(state, state["order"])
        md_path.parent.mkdir(parents=True, exist_ok=True)
        md_path.write_text(table)
        report.plot(state, state["order"], png_path)
        print("\n" + table)
        print(f"wrote {args.json or out / 'ablation.json'}, {md_path}, {png_path} "
              f"({state['total_seconds']:.0f} s wall, {state['total_cpu_seconds']:.0f} s CPU over the rows)")
        return state


def QUICK_LEVELS():
    from eval.ablation.levels import QUICK

    return QUICK


if __name__ == "__main__":
    main()

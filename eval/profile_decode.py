"""Where a batch-1 decode step spends its time: GPU kernels per step, their durations, the gaps.

    python -m eval.profile_decode --model random:llama-3.2-1b --steps-per-call 16

Runs `generate` once to compile, then once under `jax.profiler.trace`, and reads the trace back
with `jax.profiler.ProfileData` (no TensorBoard needed). Prints the kernels grouped by name
(count per decode step, mean and total time) and the step time split into kernel time and
idle gaps between kernels: the gap share says how much a fused kernel could still win.
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import tempfile
import time


def _device_plane(pd):
    planes = list(pd.planes)
    gpu = [p for p in planes if re.match(r"/device:(GPU|TPU):0", p.name)]
    return gpu[0] if gpu else next(p for p in planes if p.name.startswith("/host:CPU"))


def _kernel_kind(name: str) -> str:
    """A kernel or instruction name without its number (loop_add_fusion.12 / _12 -> loop_add_fusion)."""
    return re.sub(r"[._]\d+$", "", name)


def _frames(hlo_text: str) -> dict:
    """stack_frame_id -> "file:line function" from the tables at the top of HLO text."""
    tables, cur = collections.defaultdict(dict), None
    for line in hlo_text.splitlines():
        if line.startswith(("%", "ENTRY")):  # the computations: the tables are above them
            break
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            cur = line
        elif not line.strip():
            cur = None
        elif cur:
            k, _, v = line.partition(" ")
            tables[cur][k] = v
    out = {}
    for fid, v in tables["StackFrames"].items():
        loc = tables["FileLocations"].get(re.search(r"file_location_id=(\d+)", v).group(1), "")
        m = re.search(r"file_name_id=(\d+) function_name_id=(\d+) line=(\d+)", loc)
        if m:
            f = tables["FileNames"].get(m.group(1), "?").strip('"')
            fn = tables["FunctionNames"].get(m.group(2), "?").strip('"')
            out[fid] = f"{os.path.basename(f)}:{m.group(3)} {fn.split('.')[-1]}"
    return out


def hlo_origins(hlo_text: str) -> dict:
    """Instruction name -> (shape, JAX op name, source line) from optimized HLO text; a fusion
    without metadata takes its fused computation's root's."""
    frames = _frames(hlo_text)
    cur, instrs, roots = None, {}, {}
    for line in hlo_text.splitlines():
        if not line.startswith(" "):
            m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
            cur = m.group(1) if m else cur
            continue
        m = re.match(r"^\s*(ROOT )?%?([\w.\-]+) = (\S+?)(?:\{[^}]*\})? ", line)
        if not m:
            continue
        calls = re.search(r"calls=%?([\w.\-]+)", line)
        op = re.search(r'op_name="([^"]*)"', line)
        fr = re.search(r"stack_frame_id=(\d+)", line)
        src = re.search(r'source_file="([^"]*)" source_line=(\d+)', line)
        where = (frames.get(fr.group(1), "") if fr else
                 f"{os.path.basename(src.group(1))}:{src.group(2)}" if src else "")
        rec = (m.group(3), op.group(1) if op else "", where, calls.group(1) if calls else None)
        instrs[m.group(2)] = rec
        if m.group(1) and cur:
            roots[cur] = rec[1:3]
    out = {}
    for name, (shape, op_name, where, calls) in instrs.items():
        if not op_name and calls in roots:
            op_name, where = roots[calls]
        out[name] = (shape, op_name, where)
    return out


def print_origins(events, origins: dict, kinds: tuple, n_steps: int, top: int = 8) -> None:
    """For kernels named like `kinds`, total time per (shape, op name, source line). A kernel is named
    for its HLO instruction, with the '.' of the instruction's number as '_' on some backends."""
    origins = {**{k.replace(".", "_"): v for k, v in origins.items()}, **origins}

    def hlo_op(e):  # GPU kernel events carry their instruction as the `hlo_op` stat
        try:
            return next((str(v) for k, v in e.stats if k == "hlo_op"), e.name)
        except Exception:  # noqa: BLE001 - an event without readable stats keeps its name
            return e.name

    names = {id(e): hlo_op(e) for e in events}
    missed = sorted({names[id(e)] for e in events
                     if names[id(e)] not in origins and _kernel_kind(e.name) in kinds})
    if missed:
        print(f"(no HLO instruction for {len(missed)} kernel names, e.g. {missed[:4]}; HLO names look like "
              f"{[k for k in origins if 'fusion' in k][:4]})")
        if any(m.startswith("command_buffer") for m in missed):
            print("(XLA ran these kernels inside CUDA graphs, which the trace names command_buffer: profile with "
                  "XLA_FLAGS=--xla_gpu_enable_command_buffer= to see each kernel's source)")
    for kind in kinds:
        by = collections.defaultdict(lambda: [0, 0.0])
        for e in events:
            if _kernel_kind(e.name) != kind:
                continue
            shape, op_name, where = origins.get(names[id(e)], ("?", _kernel_kind(names[id(e)]), ""))
            # the op name's last two path parts say what it is (e.g. transpose(jvp(...))/add_any)
            key = (shape, "/".join(op_name.split("/")[-2:])[-90:], where)
            by[key][0] += 1
            by[key][1] += e.duration_ns
        if not by:
            continue
        print(f"-- {kind}: where from (per step)")
        for (shape, op, where), (cnt, tot) in sorted(by.items(), key=lambda kv: -kv[1][1])[:top]:
            print(f"   {cnt / n_steps:6.1f} x {tot / cnt / 1e3:8.1f} us  {shape[:30]:30} {where[:40]:40} {op}")


def summarize(trace_dir: str, n_steps: int, top: int = 30, hlo_text: str | None = None,
              origin_kinds: tuple = ()) -> dict:
    from jax.profiler import ProfileData

    from flashit_jax.errors import FlashitError

    paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    if not paths:
        raise FlashitError(f"no profiler trace (*.xplane.pb) under {trace_dir}")
    plane = _device_plane(ProfileData.from_file(max(paths)))
    lines = list(plane.lines)
    # a GPU plane has one line per stream plus summary lines ("XLA Ops", "XLA Modules"): keep kernels
    kern = [l for l in lines if "stream" in l.name.lower()] or lines
    events = [e for l in kern for e in l.events]
    events.sort(key=lambda e: e.start_ns)
    by = collections.defaultdict(lambda: [0, 0.0])
    for e in events:
        name = _kernel_kind(e.name)
        by[name][0] += 1
        by[name][1] += e.duration_ns
    busy = sum(e.duration_ns for e in events)
    span = (events[-1].start_ns + events[-1].duration_ns - events[0].start_ns) if events else 0
    rows = sorted(by.items(), key=lambda kv: -kv[1][1])
    print(f"plane {plane.name}: lines {[l.name for l in lines]}")
    print(f"{len(events)} kernels for {n_steps} steps = {len(events) / n_steps:.1f} per step; "
          f"kernel time {busy / n_steps / 1e3:.1f} us/step, span {span / n_steps / 1e3:.1f} us/step, "
          f"busy {busy / max(span, 1):.1%}")
    print(f"{'kernel':70} {'per step':>9} {'mean us':>9} {'us/step':>9}")
    for name, (cnt, tot) in rows[:top]:
        print(f"{name[:70]:70} {cnt / n_steps:9.2f} {tot / cnt / 1e3:9.2f} {tot / n_steps / 1e3:9.2f}")
    if hlo_text and origin_kinds:
        print_origins(events, hlo_origins(hlo_text), origin_kinds, n_steps)
    return {"kernels_per_step": len(events) / n_steps, "kernel_us_per_step": busy / n_steps / 1e3,
            "span_us_per_step": span / n_steps / 1e3}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m eval.profile_decode", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random:llama-3.2-1b")
    ap.add_argument("--steps-per-call", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=65)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--no-fuse", action="store_true")
    ap.add_argument("--recipe", default=None,
                    help="quantize the (fused) weights with this recipe first, e.g. w8+emb8 (flashit_jax.quant)")
    ap.add_argument("--trace-dir", default=None)
    args = ap.parse_args(argv)
    import jax
    import numpy as np

    from flashit_jax.errors import user_errors
    from flashit_jax.generate import generate
    from flashit_jax.loading import load_model
    from models.llama import fuse_projections

    with user_errors("python -m eval.profile_decode"):
        loaded = load_model(args.model, args.dtype)
    params = loaded.params if args.no_fuse else fuse_projections(loaded.params, loaded.config)
    if args.recipe:
        from flashit_jax.quant import quantize

        with user_errors("python -m eval.profile_decode"):
            params = jax.block_until_ready(quantize(params, args.recipe))
    prompt = np.random.default_rng(0).integers(0, loaded.config.vocab_size, args.prompt_len).tolist()
    kw = dict(max_new_tokens=args.new_tokens, steps_per_call=args.steps_per_call)
    r = generate(loaded.model, params, [prompt], **kw)
    r = generate(loaded.model, params, [prompt], **kw)
    print(f"{args.model}: {r.tokens_per_s:.1f} tok/s untraced ({jax.devices()[0].device_kind})")
    trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="flashit_trace_")
    with jax.profiler.trace(trace_dir):
        t0 = time.perf_counter()
        r = generate(loaded.model, params, [prompt], **kw)
        wall = time.perf_counter() - t0
    print(f"traced: {r.tokens_per_s:.1f} tok/s, generate wall {wall * 1e3:.1f} ms")
    # prefill + decode steps are both in the trace; the decode steps dominate at 64+ tokens
    with user_errors("python -m eval.profile_decode"):
        summarize(trace_dir, args.new_tokens - 1)


if __name__ == "__main__":
    main()

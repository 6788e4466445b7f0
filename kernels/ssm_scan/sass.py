"""What the GPU scan forward compiles to, without a GPU: Pallas' Triton IR for a bench config, compiled to
SASS for sm_90 by pip `triton`, with registers, instructions and barriers per loop iteration.

    python -m kernels.ssm_scan.sass --configs auto,16x16cok8j32w2
    python -m kernels.ssm_scan.sass --configs auto --triton-python /tmp/tv/bin/python --keep out/sass

The IR is what `pallas_call(debug=True)` prints while `jax.jit(...).trace(...).lower(lowering_platforms=
("cuda",))` lowers the kernel on a CPU; its locations are stripped so that another Triton can parse it.
`triton` is not a dependency (it is ~290 MB): install it into any Python (`python -m venv /tmp/tv &&
/tmp/tv/bin/pip install triton`) and name that Python with --triton-python. Its version differs from the one
inside jaxlib, so the counts are indicative; in session 12 they tracked the H100 timings (docs/mamba.md).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp

_COMPILE = r'''
import json, re, subprocess, sys, os
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import compile
path, warps = sys.argv[1], int(sys.argv[2])
k = compile(path, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": 1})
base = path[:-5]
open(base + ".cubin", "wb").write(k.asm["cubin"])
open(base + ".ttgir", "w").write(k.asm["ttgir"])
import triton
tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
sass = subprocess.run([os.path.join(tools, "cuobjdump"), "-sass", base + ".cubin"], capture_output=True, text=True).stdout
res = subprocess.run([os.path.join(tools, "cuobjdump"), "-res-usage", base + ".cubin"], capture_output=True, text=True).stdout
open(base + ".sass", "w").write(sass)
print(json.dumps({"sass": sass, "regs": int(re.search(r"REG:(\d+)", res).group(1))}))
'''


BATCH, LENGTH, DIM = 8, 4096, 1536  # the bench's shape (Mamba-130m's mixer at batch 8)


def triton_modules(blocks, batch: int = BATCH, length: int = LENGTH, dim: int = DIM, state: int = 16) -> dict[str, str]:
    """{kernel name: Triton IR without locations} of the scan forward (Mamba-1 layout) with these GpuBlocks."""
    from jax.experimental import pallas as pl

    from kernels.ssm_scan import gpu

    blocks = gpu.resolve_blocks(blocks, batch, length, 1, dim, state)
    S, f32 = jax.ShapeDtypeStruct, jnp.float32
    x, bc = S((batch, length, 1, dim), f32), S((batch, length, 1, state), f32)
    args = (x, x, S((1, state, dim), f32), bc, bc, S((1, dim), f32), S((batch, 1, state, dim), f32))
    plain = pl.pallas_call

    def debug_call(*a, **k):
        return plain(*a, **{**k, "debug": True, "interpret": False})

    out = io.StringIO()
    # pallas_call(debug=True) is the one place the IR is printed; the kernels call it through `gpu.pl`
    with contextlib.redirect_stdout(out):
        pl.pallas_call = debug_call
        try:
            jax.jit(lambda *a: gpu._forward(*a, blocks, False, False)).trace(*args).lower(lowering_platforms=("cuda",))
        finally:
            pl.pallas_call = plain
    text = out.getvalue()
    mods = {}
    for m in re.finditer(r"^module @(\w+) \{.*?\n\} \[unknown\]", text, re.S | re.M):
        ir = re.sub(r' "[a-z_0-9]+:"\(#loc\d+\)| \[unknown\]| loc\([^()]*\)', "", m.group(0))
        mods[m.group(1)] = ir
    if not mods:
        raise RuntimeError("no Triton module was printed: this jax's Pallas lowering did not run the Triton path")
    return mods


def loop_counts(sass: str) -> dict:
    """Instructions of the last backward-branching loop of a cuobjdump listing (the kernel's main loop), by
    opcode; the whole listing where there is none."""
    lines = [(int(m.group(1), 16), m.group(2)) for m in
             re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[0-9T] )?([A-Z][A-Z0-9_]*)[^\n]*", sass)]
    loop = lines
    for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[0-9T] )?BRA[^\n]*?(0x[0-9a-f]+)", sass):
        here, target = int(m.group(1), 16), int(m.group(2), 16)
        if target < here:
            loop = [(a, op) for a, op in lines if target <= a <= here]
    counts: dict[str, int] = {}
    for _, op in loop:
        counts[op] = counts.get(op, 0) + 1
    return {"loop_instructions": len(loop), "barriers": counts.get("BAR", 0), "mufu": counts.get("MUFU", 0),
            "by_opcode": dict(sorted(counts.items(), key=lambda kv: -kv[1])[:10])}


def main(argv=None):
    from kernels.ssm_scan.bench import parse_config

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="auto", help="bench config names (see kernels.ssm_scan.bench)")
    ap.add_argument("--triton-python", default=sys.executable, help="a Python with pip `triton` installed")
    ap.add_argument("--keep", default=None, help="directory for the .ttir/.ttgir/.cubin/.sass files")
    ap.add_argument("--state", type=int, default=16)
    args = ap.parse_args(argv)
    try:
        probe = subprocess.run([args.triton_python, "-c", "import triton"], capture_output=True, text=True)
        why = probe.stderr.strip().splitlines()[-1:] if probe.returncode else None
    except OSError as e:  # not an executable
        why = [str(e)]
    if why:
        raise SystemExit(f"{args.triton_python} cannot import triton ({why}): pip install triton there, or name a "
                         "Python that has it with --triton-python")
    out_dir = args.keep or tempfile.mkdtemp(prefix="flashit_sass_")
    os.makedirs(out_dir, exist_ok=True)
    from kernels.ssm_scan import gpu

    for name in args.configs.split(","):
        blocks = gpu.resolve_blocks(parse_config(name, args.state), BATCH, LENGTH, 1, DIM, args.state)
        for kernel, ir in triton_modules(blocks, state=args.state).items():
            path = os.path.join(out_dir, f"{name}_{kernel}.ttir")
            with open(path, "w") as f:
                f.write(ir)
            r = subprocess.run([args.triton_python, "-c", _COMPILE, path, str(blocks.num_warps)],
                               capture_output=True, text=True)
            if r.returncode:
                print(f"{name} {kernel}: triton failed: {r.stderr.strip()[-500:]}")
                continue
            got = json.loads(r.stdout.strip().splitlines()[-1])
            c = loop_counts(got["sass"])
            print(f"{name} {kernel}: {got['regs']} registers, loop {c['loop_instructions']} instructions, "
                  f"{c['barriers']} barriers, {c['mufu']} MUFU; {c['by_opcode']}")
    print(f"files in {out_dir}")


if __name__ == "__main__":
    main()

"""Execute the notebooks top to bottom with nbclient (a real Jupyter kernel), outside pytest: the
run on an accelerator, where the tests do not go.

    python -m eval.run_notebooks --out out/notebooks_gpu                          # all five, default settings
    python -m eval.run_notebooks --model PATH --small distill,ablation --out DIR  # those two on small settings

Each executed notebook is saved as DIR/NAME.ipynb (outputs included, errors too) and a summary
(status, seconds, the settings it ran with, the backend) goes to DIR/run.json.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["quickstart", "quantize_and_prune", "distill", "kernels", "ablation"]


def execute(name: str, env: dict[str, str], out: Path, timeout: int) -> dict:
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    from eval.common import env_switches

    nb = nbformat.read(HERE / f"{name}.ipynb", as_version=4)
    t0, error = time.perf_counter(), None
    with env_switches(env):  # the kernel inherits this process's environment
        try:
            NotebookClient(nb, timeout=timeout, kernel_name="python3",
                           resources={"metadata": {"path": str(HERE)}}).execute()
        except CellExecutionError as e:
            error = str(e).strip().splitlines()[-1][:300]
        except Exception as e:  # a timeout or a dead kernel: record it, run the next notebook
            error = f"{type(e).__name__}: {e}"[:300]
    seconds = time.perf_counter() - t0
    # the failing cell's own exception says more than nbclient's wrapper (a timeout, a dead kernel)
    cell_error = next((f"{o.get('ename')}: {o.get('evalue', '')}" for c in nb.cells if c.cell_type == "code"
                       for o in c.get("outputs", []) if o.get("output_type") == "error"), None)
    if error is not None and cell_error:
        error = cell_error[:300]
    nbformat.write(nb, out / f"{name}.ipynb")
    backend = next((o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                    if "backend:" in o.get("text", "")), "").strip()
    return {"name": name, "ok": error is None, "error": error, "seconds": round(seconds, 1), "env": env,
            "runtime": backend}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eval.run_notebooks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--names", default=",".join(NAMES))
    ap.add_argument("--model", default=None, help="FLASHIT_JAX_NB_MODEL (default: each notebook's, smollm2-135m)")
    ap.add_argument("--small", default="", help="comma-separated notebooks to run with FLASHIT_JAX_NB_SMALL=1")
    ap.add_argument("--out", default="out/notebooks_run")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    args = ap.parse_args(argv)
    names = [n for n in args.names.split(",") if n]
    unknown = sorted(set(names) - set(NAMES))
    if unknown:
        ap.error(f"unknown notebooks {unknown}; known: {NAMES}")
    missing = [m for m in ("nbclient", "ipykernel") if importlib.util.find_spec(m) is None]
    if missing:
        ap.error(f"needs {' and '.join(missing)}: pip install nbclient ipykernel (the `test` extra has them)")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    small = set(s for s in args.small.split(",") if s)
    results = []
    for name in names:
        env = {"FLASHIT_JAX_NB_SMALL": "1" if name in small else "0", "FLASHIT_JAX_NB_OUT": str(out / "work"),
               "MPLBACKEND": "Agg"}
        if args.model:
            env["FLASHIT_JAX_NB_MODEL"] = args.model
        r = execute(name, env, out, args.timeout)
        results.append(r)
        print(f"{name:20s} {'ok' if r['ok'] else 'FAILED'} in {r['seconds']:.0f} s  {r['runtime']}"
              + (f"\n  {r['error']}" if r["error"] else ""), flush=True)
        (out / "run.json").write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "results": results}, indent=1))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

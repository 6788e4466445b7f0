"""Sequential calibration (GPTQ's own order): layer i is quantized from the inputs it sees when layers
0..i-1 are already quantized, so its rounding also absorbs the error those inputs carry. `quantize` with
one `calibrate` pass takes every layer's statistics from the float model instead.

    from flashit_jax.quant.sequential import quantize_sequential
    q = quantize_sequential(model, params, "w4g64-gptq", tokens)   # tokens int32 [S, T]

One calibration pass per layer, each through layers 0..i only (the stats step returns no logits, so XLA
drops the output head): about (L + 1) / 2 forwards over the calibration tokens, against one.
Methods that fold scales across layers from one calibration (AWQ, SmoothQuant) are refused.
"""
from __future__ import annotations

from flashit_jax import tree
from flashit_jax.errors import FlashitError
from flashit_jax.quant.calib import calibrate
from flashit_jax.quant.quantize import quantize
from flashit_jax.quant.recipes import resolve


def _first_layers(params, n: int):
    layers = params["layers"]
    if isinstance(layers, dict):
        return dict(params, layers={k: v for k, v in layers.items() if int(k) < n})
    return dict(params, layers=list(layers)[:n])


def quantize_sequential(model, params, recipe, tokens, *, batch_size: int = 4, progress: bool = True,
                        log: list | None = None):
    """`quantize(params, recipe, calib)` with each layer's calibration taken from the partly quantized model."""
    from tqdm.auto import tqdm

    name, rules = resolve(recipe)
    smoothing = sorted({type(m).__name__ for _, m in rules if m is not None and m.smoothing})
    if smoothing:
        raise FlashitError(f"recipe {name}: sequential calibration is for methods that quantize each matrix on its "
                           f"own (GPTQ, RTN); {', '.join(smoothing)} folds scales across layers from one calibration")
    if "layers" not in params:
        raise FlashitError("sequential calibration needs a model whose parameters hold a 'layers' stack")
    n = len(params["layers"])
    first_match = tree.first_match
    paths = list(tree.flatten(params))
    cur = params
    for i in tqdm(range(n), desc=f"sequential {name}", unit="layer", disable=not progress):
        prefix = f"layers/{i}/"
        if not any(p.startswith(prefix) and first_match(p, rules) is not None for p in paths):
            continue
        calib = calibrate(model, _first_layers(cur, i + 1), tokens, batch_size=batch_size, progress=False,
                          source={"sequential": True})
        cur = quantize(cur, [(rf"(?!{prefix}).*", None), *rules], calib, log=log)
    # what the recipe quantizes outside the stack (an int8 embedding, an untied head) sees the quantized stack
    rest = [p for p in paths if not p.startswith("layers/") and first_match(p, rules) is not None]
    if rest:
        calib = None
        if any(first_match(p, rules).needs_calibration for p in rest):
            calib = calibrate(model, cur, tokens, batch_size=batch_size, progress=False, source={"sequential": True})
        cur = quantize(cur, [(r"layers/.*", None), *rules], calib, log=log)
    return cur

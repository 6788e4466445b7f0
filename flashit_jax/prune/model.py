"""`prune_model(model, params, recipe, tokens)`: any recipe, structured or not, with its calibration.

Structured parts (`ffn-25+heads-25`) run left to right; each is scored on a calibration pass
over the model as the previous parts left it, and returns a smaller config. Unstructured
recipes calibrate once (if they need to) and call `prune`.
"""
from __future__ import annotations

from flashit_jax import tree
from flashit_jax.errors import FlashitError
from flashit_jax.prune import structured as st
from flashit_jax.prune.recipes import is_structured, resolve, structured_parts
from flashit_jax.prune.unstructured import prune


def _need_tokens(tokens, what: str):
    if tokens is None:
        raise FlashitError(f"{what} needs calibration tokens (CLI: --calib DATA)")


def prune_model(model, params, recipe, tokens=None, *, calib=None, normalize: str = "layer", progress: bool = False,
                log: list | None = None):
    """(model, params, info) after `recipe`. tokens int32 [S, T]: calibration sequences (Wanda,
    SparseGPT and every structured recipe need them, or a ready `calib` for the unstructured ones)."""
    from flashit_jax.quant import calibrate
    from models import Model

    log = [] if log is None else log
    if not is_structured(recipe):
        name, rules = resolve(recipe)
        needs = any(m is not None and m.needs_calibration for _, m in rules)
        if needs and calib is None:
            _need_tokens(tokens, f"recipe {name}")
            calib = calibrate(model, params, tokens, progress=progress)
        out = prune(params, recipe, calib, progress=progress, log=log)
        return model, out, {"recipe": name, "structured": False,
                            "calibration": None if calib is None else calib.describe()}
    if any(type(x).__module__ == "flashit_jax.nn.sparse" or type(x).__name__ == "QArray"
           for x in tree.flatten(params).values()):
        raise FlashitError("structured pruning slices plain float weights; apply it before unstructured pruning "
                           "or quantization")
    config = model.config
    if not hasattr(config, "heads_at"):
        raise FlashitError(f"structured pruning supports the Llama family, not {type(config).__name__}")
    _need_tokens(tokens, f"structured recipe {recipe}")
    info = {"recipe": recipe, "structured": True, "before": st.summarize(config, params), "parts": []}
    for what, amount in structured_parts(recipe):
        s = st.Structure.full(config, params)
        if what == "depth":
            s = st.select_layers(s, st.layer_influence(Model(config), params, tokens), amount)
        else:
            c = calibrate(Model(config), params, tokens, progress=progress)
            if what == "ffn":
                s = st.select_ffn(s, params, c, amount, normalize=normalize)
            else:
                s = st.select_heads(s, config, params, c, amount, unit="query" if what == "heads" else "kv",
                                    normalize=normalize)
        config, params = st.compact(config, params, s)
        part = {"part": f"{what}-{amount * 100 if what != 'depth' else amount:g}", "structure": s.to_json(),
                **st.summarize(config, params)}
        info["parts"].append(part)
        log.append(part)
    info["after"] = st.summarize(config, params)
    return Model(config), params, info

"""Loaded weights must match the config exactly: a wrong file fails loudly, not silently."""
from __future__ import annotations

import jax

from flashit_jax import tree
from flashit_jax.errors import FlashitError


def expected_shapes(model) -> dict[str, tuple[int, ...]]:
    shapes = jax.eval_shape(lambda: model.init_params(jax.random.key(0)))
    return {k: tuple(v.shape) for k, v in tree.flatten(shapes).items()}


def check_params(model, flat: dict, source: str) -> None:
    """Raise FlashitError naming every missing, unexpected or mis-shaped tensor."""
    want = expected_shapes(model)
    missing = sorted(set(want) - set(flat))
    extra = sorted(set(flat) - set(want))
    wrong = [f"{k}: file {tuple(flat[k].shape)} vs config {want[k]}"
             for k in sorted(set(want) & set(flat)) if tuple(flat[k].shape) != want[k]]
    problems = []
    if missing:
        problems.append(f"missing tensors {missing[:6]}{' ...' if len(missing) > 6 else ''}")
    if extra:
        problems.append(f"unexpected tensors {extra[:6]}{' ...' if len(extra) > 6 else ''}")
    if wrong:
        problems.append("shape mismatch " + "; ".join(wrong[:6]) + (" ..." if len(wrong) > 6 else ""))
    if problems:
        raise FlashitError(f"{source}: weights do not match the config: " + "; ".join(problems))

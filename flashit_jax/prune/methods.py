"""Pruning methods: the values of recipe rules. Frozen, JSON-able (transforms.json).

Every unstructured method removes either a fraction `sparsity` of each comparison group
(exactly round(sparsity * group size) weights of each group) or, with `nm=(n, m)`, all but n
of every m consecutive inputs of each output (N:M; sparsity is then 1 - n/m).

    Magnitude(scope="layer")   |w|, one comparison group per matrix
    Magnitude(scope="global")  |w|, one group over every matrix the rule matches
    Wanda                      |w_ij| * ||x_i||_2, one group per output column of the [in, out] weight
    SparseGPT                  OBS reconstruction with the calibration Hessian (quant/obs.py, shared
                               with GPTQ); masks chosen per block of `mask_block` inputs by
                               w^2 / [H^-1]_jj, one group per block (flattened over outputs)
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

from flashit_jax.errors import FlashitError


def check_sparsity(sparsity) -> float:
    try:
        s = float(sparsity)
    except (TypeError, ValueError):
        raise FlashitError(f"sparsity must be a number in [0, 1), got {sparsity!r}") from None
    if not (0.0 <= s < 1.0) or math.isnan(s):
        raise FlashitError(f"sparsity must be in [0, 1) (the fraction of weights removed), got {sparsity!r}")
    return s


def check_nm(nm) -> tuple[int, int] | None:
    if nm is None:
        return None
    try:
        n, m = (int(v) for v in nm)
    except (TypeError, ValueError):
        raise FlashitError(f"N:M must be two integers (n kept of every m), got {nm!r}") from None
    if m < 1 or n < 1:
        raise FlashitError(f"N:M needs positive N and M (N kept of every M), got {n}:{m}")
    if n > m:
        raise FlashitError(f"N:M keeps N of every M weights; N ({n}) must not exceed M ({m})")
    if m > 32 or n * max(1, (m - 1).bit_length()) > 32:
        raise FlashitError(f"N:M {n}:{m} is not supported (M <= 32, N * ceil(log2 M) <= 32 metadata bits)")
    return n, m


def group_count(sparsity: float, size: int) -> int:
    """How many of `size` weights a group loses: round half up, so the fraction is exact to 1/size."""
    return int(math.floor(sparsity * size + 0.5))


@dataclasses.dataclass(frozen=True)
class Method:
    name: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = False
    sparsity: float = 0.5
    nm: tuple[int, int] | None = None
    output: str = "auto"  # "auto" (N:M -> NMArray, else MaskedArray), "masked", "dense" (plain arrays with zeros)

    def __post_init__(self):
        object.__setattr__(self, "nm", check_nm(self.nm))
        if self.nm is not None:
            object.__setattr__(self, "sparsity", 1.0 - self.nm[0] / self.nm[1])
        object.__setattr__(self, "sparsity", check_sparsity(self.sparsity))
        if self.output not in ("auto", "masked", "dense"):
            raise FlashitError(f"output must be auto, masked or dense, got {self.output!r}")

    @property
    def pattern(self) -> str:
        return f"{self.nm[0]}:{self.nm[1]}" if self.nm else "unstructured"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["nm"] = None if self.nm is None else list(self.nm)
        return {"method": self.name, **d}

    def describe(self) -> str:
        what = self.pattern if self.nm else f"{100 * self.sparsity:g}%"
        extra = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("sparsity", "nm", "output")}
        tail = "".join(f", {k}={v}" for k, v in extra.items())
        return f"{self.name}({what}{tail})"


@dataclasses.dataclass(frozen=True)
class Magnitude(Method):
    name: ClassVar[str] = "magnitude"
    scope: str = "layer"  # "layer": per matrix; "global": one threshold over every matched matrix

    def __post_init__(self):
        super().__post_init__()
        if self.scope not in ("layer", "global"):
            raise FlashitError(f"magnitude scope must be 'layer' or 'global', got {self.scope!r}")
        if self.scope == "global" and self.nm is not None:
            raise FlashitError("global magnitude pruning is unstructured; N:M groups are per output already")


@dataclasses.dataclass(frozen=True)
class Wanda(Method):
    name: ClassVar[str] = "wanda"
    needs_calibration: ClassVar[bool] = True


@dataclasses.dataclass(frozen=True)
class SparseGPT(Method):
    name: ClassVar[str] = "sparsegpt"
    needs_calibration: ClassVar[bool] = True
    mask_block: int = 128  # inputs per mask-selection block (the largest divisor of `in` <= this is used)
    damp: float = 0.01

    def __post_init__(self):
        super().__post_init__()
        if self.mask_block < 1:
            raise FlashitError(f"mask_block must be positive, got {self.mask_block}")


METHODS = {c.name: c for c in (Magnitude, Wanda, SparseGPT)}


def method_from_dict(d: dict) -> Method:
    d = dict(d)
    name = d.pop("method", None)
    if name not in METHODS:
        raise FlashitError(f"unknown pruning method {name!r}; known: {sorted(METHODS)}")
    if d.get("nm") is not None:
        d["nm"] = tuple(d["nm"])
    try:
        return METHODS[name](**d)
    except TypeError as e:
        raise FlashitError(f"invalid {name} settings {d}: {e}") from None

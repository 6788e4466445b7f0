"""Quantization methods: the values of recipe rules. Frozen, JSON-able (transforms.json)."""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from flashit_jax.errors import FlashitError


@dataclasses.dataclass(frozen=True)
class Method:
    name: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = False
    smoothing: ClassVar[bool] = False  # folds per-channel scales into the preceding layer

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.name, **dataclasses.asdict(self)}

    def describe(self) -> str:
        fields = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(self).items())
        return f"{self.name}({fields})"

    def short(self) -> str:
        """A few words for tables."""
        return self.describe()


def _grid(bits, group_size, symmetric) -> str:
    return f"{bits}-bit {'sym' if symmetric else 'asym'} {'per channel' if group_size is None else f'g{group_size}'}"


@dataclasses.dataclass(frozen=True)
class RTN(Method):
    """Round to nearest. group_size None: one group per output channel (per channel)."""

    name: ClassVar[str] = "rtn"
    bits: int = 8
    group_size: int | None = None
    symmetric: bool = True
    per_tensor: bool = False
    scale_dtype: str = "float16"

    def short(self) -> str:
        return f"RTN {_grid(self.bits, None, True) if self.per_tensor else _grid(self.bits, self.group_size, self.symmetric)}" \
            + (" per tensor" if self.per_tensor else "")


@dataclasses.dataclass(frozen=True)
class GPTQ(Method):
    """act_order (default): columns by decreasing Hessian diagonal, with group parameters fixed up
    front ("static groups", so the stored format is unchanged and costs nothing at run time);
    clip (default, with static groups): each group's range from AWQ's clipping search."""

    name: ClassVar[str] = "gptq"
    needs_calibration: ClassVar[bool] = True
    bits: int = 4
    group_size: int | None = 64
    symmetric: bool = False
    damp: float = 0.01
    act_order: bool = True
    clip: bool = True
    scale_dtype: str = "float16"

    def short(self) -> str:
        extra = [x for x, on in (("act-order", self.act_order), ("clip search", self.clip and self.act_order)) if on]
        return f"GPTQ {_grid(self.bits, self.group_size, self.symmetric)}" + (f" ({', '.join(extra)})" if extra else "")


@dataclasses.dataclass(frozen=True)
class AWQ(Method):
    """Activation-aware scales s = mean|x|^alpha (alpha searched on a grid against the layer's
    output error), folded into the preceding norm/linear; then per-group clipping search and RTN."""

    name: ClassVar[str] = "awq"
    needs_calibration: ClassVar[bool] = True
    smoothing: ClassVar[bool] = True
    bits: int = 4
    group_size: int | None = 64
    symmetric: bool = False
    grid: int = 20
    clip: bool = True
    scale_dtype: str = "float16"

    def short(self) -> str:
        return f"AWQ {_grid(self.bits, self.group_size, self.symmetric)}" + (" (clip search)" if self.clip else "")


@dataclasses.dataclass(frozen=True)
class W8A8(Method):
    """Per-output-channel int8 weights, per-token dynamic int8 activations, int32 accumulation."""

    name: ClassVar[str] = "w8a8"

    def short(self) -> str:
        return "int8 W per channel x int8 X per token"


@dataclasses.dataclass(frozen=True)
class SmoothQuant(Method):
    """W8A8 after migrating activation outliers into the weights: s_j = max|x_j|^a / max|w_j|^(1-a)."""

    name: ClassVar[str] = "smoothquant"
    needs_calibration: ClassVar[bool] = True
    smoothing: ClassVar[bool] = True
    alpha: float = 0.5

    def short(self) -> str:
        return f"SmoothQuant alpha={self.alpha}, then int8 W x int8 X"


@dataclasses.dataclass(frozen=True)
class LLMInt8(Method):
    """Vector-wise int8 with outlier input columns (any |x| >= threshold in the batch) in float."""

    name: ClassVar[str] = "llm-int8"
    threshold: float = 6.0

    def short(self) -> str:
        return f"LLM.int8: int8 W x int8 X, input columns with abs(x) >= {self.threshold:g} in float"


@dataclasses.dataclass(frozen=True)
class FP8(Method):
    """float8 e4m3 weights, one fp32 scale per output channel; activations stay in float."""

    name: ClassVar[str] = "fp8"

    def short(self) -> str:
        return "fp8 e4m3 W, scale per channel"


METHODS: dict[str, type[Method]] = {m.name: m for m in (RTN, GPTQ, AWQ, W8A8, SmoothQuant, LLMInt8, FP8)}


def method_from_dict(d: dict[str, Any]) -> Method:
    d = dict(d)
    name = d.pop("method", None)
    if name not in METHODS:
        raise FlashitError(f"unknown quantization method {name!r}; known: {sorted(METHODS)}")
    try:
        return METHODS[name](**d)
    except TypeError as e:
        raise FlashitError(f"bad fields for method {name!r}: {e}") from None

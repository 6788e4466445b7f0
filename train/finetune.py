"""Fine-tune a model on a corpus with the training stack of train.distill (cross-entropy).

    python -m train.finetune --model smollm2-135m --data ../shared/data/shakespeare --steps 200 --out out/ft
    python -m train.finetune --model smollm2-135m --qat-bits 4 --qat-group 32 --out out/qat4   # QAT

    python -m train.finetune --model smollm2-135m --qat-method bitnet --out out/bitnet   # BitNet b1.58 QAT
    python -m train.finetune --model smollm2-135m --lora-rank 16 --lora-base w4g64 --out out/qlora  # QLoRA

--qat-method bitnet: ternary absmean weights x int8 per-token activations, straight-through
(flashit_jax/quant/ternary.py); the saved model holds packed ternary weights.
--lora-rank R (--lora-alpha, --lora-rules, --lora-base RECIPE): train only low-rank adapters on the
frozen base, quantized first by RECIPE (QLoRA); the saved model is the merged bf16 model and
OUT/adapters.safetensors the adapters.
A pruned model (eval.prune's output: MaskedArray / NMArray weights) is re-fine-tuned with its
pruned weights held at 0, and saved with the same sparse types.

--qat-bits B: straight-through fake quantization (RTN, per group of --qat-group input rows,
--qat-symmetric true|false) of the weights matching --qat-rules during training; the saved model
holds the weights on that quantization grid. Every flag is a TrainConfig field (train/config.py).
"""
from __future__ import annotations

from pathlib import Path

import jax

from flashit_jax.errors import FlashitError, user_errors
from train.config import parse_args

PROG = "python -m train.finetune"


def build_task(cfg):
    import re

    from flashit_jax.loading import load_model
    from train import qat
    from train.loop import Task
    from train.step import Objective

    if cfg.loss != "ce":
        raise FlashitError(f"train.finetune trains with cross-entropy (--loss ce); for {cfg.loss!r} use train.distill")
    loaded = load_model(cfg.model, "float32", seed=cfg.seed)
    if cfg.lora_rank:
        if cfg.qat_bits or cfg.qat_method != "rtn":
            raise FlashitError("LoRA (--lora-rank) and QAT (--qat-bits / --qat-method) do not combine")
        return _lora_task(cfg, loaded)
    rules = ()
    record = {"transform": "finetune", "model": cfg.model, "loss": "ce"}
    prepare = None
    if cfg.qat_method not in ("rtn", "bitnet"):
        raise FlashitError(f"--qat-method must be rtn or bitnet, got {cfg.qat_method!r}")
    if cfg.qat_method == "bitnet":
        try:
            re.compile(cfg.qat_rules)
        except re.error as e:
            raise FlashitError(f"--qat-rules {cfg.qat_rules!r}: invalid regex: {e}") from None
        if cfg.qat_bits:
            raise FlashitError("--qat-method bitnet is ternary (1.58 bits): leave --qat-bits at 0")
        rules = ((cfg.qat_rules, qat.BitNetQAT()),)
        record["qat"] = {"method": "bitnet-b1.58", "rules": cfg.qat_rules,
                         "note": "linear weights saved packed ternary (TernaryArray), int8 per-token activations"}

        def prepare(params):
            return qat.apply_quantized(params, list(rules))
    elif cfg.qat_bits:
        try:
            re.compile(cfg.qat_rules)
        except re.error as e:
            raise FlashitError(f"--qat-rules {cfg.qat_rules!r}: invalid regex: {e}") from None
        fq = qat.FakeQuant(cfg.qat_bits, cfg.qat_group, cfg.qat_symmetric)
        rules = ((cfg.qat_rules, fq),)
        record["qat"] = {"bits": fq.bits, "group": fq.group, "symmetric": fq.symmetric, "rules": cfg.qat_rules,
                         "note": "weights saved on the RTN grid (dequantized); pack them with flashit_jax.quant"}

        def prepare(params):
            return qat.apply_quantized(params, list(rules))
    params, masks = loaded.params, None
    sparse = sparse_leaves(params)
    if sparse:
        # a pruned model (MaskedArray / NMArray leaves): train the dense copy with the pruned
        # weights held at 0, and save the same sparse types back
        if cfg.qat_bits:
            raise FlashitError("QAT of a pruned model is not supported; fine-tune the pruned model first")
        from flashit_jax import prune as pr
        from flashit_jax import tree

        like = params
        params, masks = pr.densify(params), tree.unflatten(pr.masks_of(params))
        record["sparse"] = {"matrices": len(sparse), "sparsity": round(pr.sparsity(like)["sparsity"], 6)}

        def prepare(p):
            return pr.resparsify(p, like)
    obj = Objective(loss="ce", qat=rules)
    return Task(loaded.model, params, loaded.tokenizer, obj, transforms=list(loaded.transforms),
                record=record, prepare_save=prepare, masks=masks)


def sparse_leaves(params) -> list[str]:
    """Paths of pruned leaves; refuses online-pruned (ActSparse) ones, which are not trained."""
    from flashit_jax import tree

    out = []
    for path, x in tree.flatten(params).items():
        kind = type(x).__name__
        if kind == "ActSparse":
            raise FlashitError(f"{path} is online-pruned (ActSparse): fine-tune the dense model, then prune online")
        if kind in ("MaskedArray", "NMArray"):
            out.append(path)
    return out


def _lora_task(cfg, loaded):
    """LoRA / QLoRA: adapters are the trained parameters; the base (quantized by --lora-base, if
    given) is a frozen input of the step. The saved model is the merged bf16 model; the adapters
    are saved beside it (OUT/adapters.safetensors) by `save_adapters`."""
    import jax
    import jax.numpy as jnp

    from flashit_jax import lora
    from flashit_jax.quant import quantize
    from train.loop import Task, parse_dtype
    from train.step import Objective, cast_floats

    rules = lora.parse_rules(cfg.lora_rules, cfg.lora_rank, cfg.lora_alpha)
    base = loaded.params
    if cfg.lora_base:
        base = quantize(base, cfg.lora_base, progress=cfg.progress)  # RTN-type recipes (no calibration here)
    base = cast_floats(base, parse_dtype(cfg.compute_dtype))  # the frozen base runs in the compute dtype
    adapters = lora.init_adapters(loaded.params, rules, jax.random.key(cfg.seed))
    scales = lora.scale_of(rules, adapters)

    def combine(trained, frozen):
        return lora.attach(frozen, trained, scales)

    def prepare(trained, frozen):
        return lora.merge(lora.attach(frozen, trained, scales), jnp.bfloat16)

    record = {"transform": "lora", "model": cfg.model, "loss": "ce", "rank": cfg.lora_rank, "alpha": cfg.lora_alpha,
              "rules": cfg.lora_rules, "base": cfg.lora_base or "float",
              "adapter_params": lora.n_adapter_params(adapters),
              "note": "saved model = base (dequantized) + adapters merged in bf16; re-quantize it separately"}
    return Task(loaded.model, adapters, loaded.tokenizer, Objective(loss="ce"), transforms=list(loaded.transforms),
                record=record, prepare_save=prepare, frozen_params=base, combine=combine)


def main(argv=None):
    cfg = parse_args(argv, prog=PROG, description=__doc__, defaults={"out": "out/finetune", "loss": "ce",
                                                                     "teacher": ""})
    with user_errors("train.finetune"):
        from train.loop import init_distributed, run

        init_distributed(cfg)
        task = build_task(cfg)
        summary = run(cfg, task, prog="finetune")
        state = summary.pop("state", None)
        if cfg.lora_rank and state is not None and jax.process_index() == 0:
            from flashit_jax import lora

            summary["adapters"] = str(lora.save_adapters(Path(cfg.out) / "adapters.safetensors",
                                                         jax.device_get(state["params"]["model"]), task.record))
        return summary


if __name__ == "__main__":
    main()

"""Fine-tune a model on a corpus with the training stack of train.distill (cross-entropy).

    python -m train.finetune --model smollm2-135m --data ../shared/data/shakespeare --steps 200 --out out/ft
    python -m train.finetune --model smollm2-135m --qat-bits 4 --qat-group 32 --out out/qat4   # QAT

A pruned model (eval.prune's output: MaskedArray / NMArray weights) is re-fine-tuned with its
pruned weights held at 0, and saved with the same sparse types.

--qat-bits B: straight-through fake quantization (RTN, per group of --qat-group input rows,
--qat-symmetric true|false) of the weights matching --qat-rules during training; the saved model
holds the weights on that quantization grid. Every flag is a TrainConfig field (train/config.py).
"""
from __future__ import annotations

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
    rules = ()
    record = {"transform": "finetune", "model": cfg.model, "loss": "ce"}
    prepare = None
    if cfg.qat_bits:
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


def main(argv=None):
    cfg = parse_args(argv, prog=PROG, description=__doc__, defaults={"out": "out/finetune", "loss": "ce",
                                                                     "teacher": ""})
    with user_errors("train.finetune"):
        from train.loop import init_distributed, run

        init_distributed(cfg)
        summary = run(cfg, build_task(cfg), prog="finetune")
        summary.pop("state", None)
        return summary


if __name__ == "__main__":
    main()

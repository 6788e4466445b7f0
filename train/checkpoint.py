"""Run directories: the recorded config, orbax checkpoints (async, keep-last-K), resume.

OUT/run_config.json   the fields that define the run; a later start with other values is refused
OUT/ckpt/<step>/      orbax CheckpointManager: {state: params, optimizer, step, rng; meta: data position}
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from flashit_jax.errors import FlashitError
from train.config import RESUMABLE, TrainConfig


# Fields added after runs were recorded: left out of the identity at their defaults, so that
# those runs still resume.
LATER_FIELDS = ("qat_method", "lora_rank", "lora_alpha", "lora_rules", "lora_base")


def run_identity(cfg: TrainConfig, extra: dict | None = None) -> dict:
    default = TrainConfig()
    d = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUMABLE
         and not (k in LATER_FIELDS and v == getattr(default, k))}
    return {**d, **(extra or {})}


def check_run_dir(out: Path, identity: dict) -> bool:
    """True if OUT holds an earlier start of this same run (resume), False if it is new.

    Raises before anything is written when OUT belongs to another run."""
    rc = out / "run_config.json"
    if rc.exists():
        try:
            old = json.loads(rc.read_text())
        except json.JSONDecodeError as e:
            raise FlashitError(f"{rc}: unreadable ({e}); refusing to write into {out}") from None
        diff = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
        if diff:
            shown = ", ".join(f"{k}: {old.get(k)!r} -> {identity.get(k)!r}" for k in diff[:6])
            raise FlashitError(f"{out} holds a run with another config ({shown}{', ...' if len(diff) > 6 else ''}); "
                               "use another --out, or the same settings to resume. Nothing was written.")
        return True
    if (out / "ckpt").exists() or (out / "model").exists():
        raise FlashitError(f"{out} holds checkpoints or a model but no run_config.json: not a run this tool "
                           "started; use another --out. Nothing was written.")
    return False


def write_run_config(out: Path, identity: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "run_config.json.tmp"
    tmp.write_text(json.dumps(identity, indent=2, sort_keys=True))
    tmp.replace(out / "run_config.json")


class Checkpointer:
    """orbax CheckpointManager around the train state plus a JSON meta record."""

    def __init__(self, directory: Path, *, every: int, keep: int, async_save: bool = True):
        import orbax.checkpoint as ocp

        self.ocp = ocp
        self.every = every
        opts = ocp.CheckpointManagerOptions(max_to_keep=max(1, keep), enable_async_checkpointing=async_save,
                                            create=True)
        self.mngr = ocp.CheckpointManager(Path(directory).absolute(), options=opts, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.mngr.latest_step()

    def save(self, step: int, state, meta: dict, *, force: bool = False) -> bool:
        ocp = self.ocp
        return self.mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                            meta=ocp.args.JsonSave(meta)), force=force)

    def restore(self, step: int, like_state):
        """State restored onto the shardings and dtypes of `like_state` (arrays or ShapeDtypeStructs)."""
        import jax

        ocp = self.ocp
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like_state)
        out = self.mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                              meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def wait(self) -> None:
        self.mngr.wait_until_finished()

    def close(self) -> None:
        self.mngr.close()

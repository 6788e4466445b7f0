"""Logits of every Llama-family variant equal transformers' (fp32, highest precision)."""
import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES, have

from flashit_jax.loading import load_model
from parity_models import FAMILIES

LIVE = have("torch") and have("transformers")
TOL = 1e-4


def _ours(path, ids):
    loaded = load_model(str(path), "float32")
    logits, _, _ = loaded.model.forward(loaded.params, jnp.asarray(ids, jnp.int32))
    return loaded, np.asarray(logits)


@pytest.mark.parity
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_matches_transformers(family, tmp_path):
    if LIVE:
        from parity_models import build, hf_logits

        model, ids = build(family)
        model.save_pretrained(tmp_path, safe_serialization=True)
        want = hf_logits(model, ids)
        path = tmp_path
    else:
        path = FIXTURES / "parity" / family
        data = np.load(path / "expected.npz")
        ids, want = data["ids"], data["logits"]
    loaded, got = _ours(path, ids)
    assert loaded.config.family in (family, "llama")
    err = np.abs(got - want).max()
    assert err <= TOL, f"{family}: max abs logit diff {err:.2e} > {TOL}"
    assert np.abs(want).max() > 0.05  # logits carry signal, so the comparison means something


def test_fixtures_match_their_config():
    """Stored fixtures load and agree with their stored logits even when transformers is present."""
    versions = json.loads((FIXTURES / "parity" / "versions.json").read_text())
    assert {"torch", "transformers"} <= set(versions)
    path = FIXTURES / "parity" / "mistral"
    data = np.load(path / "expected.npz")
    _, got = _ours(path, data["ids"])
    assert np.abs(got - data["logits"]).max() <= TOL


def test_old_and_new_rope_config_keys_agree(tmp_path):
    """`rope_parameters` (transformers >= 5) and `rope_theta` + `rope_scaling` (older) load alike."""
    src = FIXTURES / "parity" / "llama"
    cfg = json.loads((src / "config.json").read_text())
    params = cfg.pop("rope_parameters", None)
    if params is None:
        pytest.skip("fixture already in the old format")
    old = dict(cfg, rope_theta=params["rope_theta"],
               rope_scaling={k: v for k, v in params.items() if k != "rope_theta"})
    shutil.copytree(src, tmp_path / "old")
    (tmp_path / "old" / "config.json").write_text(json.dumps(old))
    a = load_model(str(src)).config
    b = load_model(str(tmp_path / "old")).config
    assert a == b and a.rope_scaling is not None and a.rope_scaling.kind == "llama3"

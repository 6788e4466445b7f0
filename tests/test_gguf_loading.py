"""GGUF loading: llama.cpp's name mapping, Q/K un-permutation, Gemma norms, dequantization."""
import numpy as np
import pytest
from conftest import have

from flashit_jax import FlashitError
from flashit_jax.loading import load_model

pytestmark = pytest.mark.skipif(not (have("torch") and have("transformers")),
                                reason="builds GGUFs from tiny transformers models (parity extra)")


@pytest.mark.parametrize("family,arch", [("llama", "llama"), ("smollm2", "llama"), ("qwen2", "qwen2"),
                                         ("gemma", "gemma")])
def test_gguf_f32_matches_transformers(family, arch, tmp_path):
    import jax.numpy as jnp
    from gguf_writer import hf_to_gguf
    from parity_models import build, hf_logits

    model, ids = build(family)
    if family == "llama":  # llama.cpp stores llama3 rope scaling as rope_freqs; keep this case plain
        model.config.rope_parameters = {"rope_type": "default", "rope_theta": 50000.0}
        model.model.rotary_emb.__init__(model.config)
    want = hf_logits(model, ids)
    path = tmp_path / "m.gguf"
    hf_to_gguf(model, path, arch)
    loaded = load_model(str(path))
    got = np.asarray(loaded.model.forward(loaded.params, jnp.asarray(ids, jnp.int32))[0])
    assert np.abs(got - want).max() <= 1e-4


@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0"])
def test_quantized_matrices_dequantize_in_our_layout(qtype, tmp_path):
    import gguf
    from gguf_writer import hf_to_gguf
    from parity_models import build

    model, _ = build("qwen2")
    model.config.intermediate_size = 64
    path = tmp_path / "m.gguf"
    hf_to_gguf(model, path, "qwen2", qtype=qtype)
    loaded = load_model(str(path))
    hf_w = model.state_dict()["model.layers.1.mlp.down_proj.weight"].float().numpy()  # [out, in]
    qt = getattr(gguf.GGMLQuantizationType, qtype)
    want = gguf.quants.dequantize(gguf.quants.quantize(np.ascontiguousarray(hf_w), qt), qt).T
    got = np.asarray(loaded.params["layers"][1]["mlp"]["down"]["w"])
    assert got.shape == want.shape == (64, 32)
    assert np.array_equal(got, want.astype(np.float32))
    assert np.abs(got - hf_w.T).max() < 0.2 * np.abs(hf_w).max()

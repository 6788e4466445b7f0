"""Mixtral from HF directories and GGUF files (written here from the tiny HF fixture, the way
llama.cpp's converter writes them: arch `llama`, Q/K rows permuted, experts stacked or per expert)."""
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from flashit_jax import FlashitError, tree
from flashit_jax.loading import load_model
from flashit_jax.loading.hf import read_safetensors
from models.mixtral import MixtralConfig

FIX = Path(__file__).parent / "fixtures" / "parity" / "mixtral"


def _expected():
    e = np.load(FIX / "expected.npz")
    return e["ids"], e["logits"]


def _llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # convert_hf_to_gguf.py's LlamaModel.permute: rotary pairs interleaved per head
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_mixtral_gguf(path: Path, *, stacked: bool = True, hf_dir: Path = FIX, dtype=np.float32):
    import gguf

    cfg = json.loads((hf_dir / "config.json").read_text())
    hf = read_safetensors(hf_dir / "model.safetensors")
    n_head, n_kv, n_exp = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["num_local_experts"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-mixtral")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_expert_count(n_exp)
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    w.add_tokenizer_model("gpt2")
    w.add_token_list([chr(0x100 + i) for i in range(cfg["vocab_size"])])
    w.add_token_merges([])

    def put(name, arr):
        w.add_tensor(name, np.ascontiguousarray(arr).astype(dtype))

    put("token_embd.weight", hf["model.embed_tokens.weight"])
    put("output_norm.weight", hf["model.norm.weight"])
    put("output.weight", hf["lm_head.weight"])
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        put(f"blk.{i}.attn_q.weight", _llamacpp_permute(hf[p + "self_attn.q_proj.weight"], n_head))
        put(f"blk.{i}.attn_k.weight", _llamacpp_permute(hf[p + "self_attn.k_proj.weight"], n_kv))
        put(f"blk.{i}.attn_v.weight", hf[p + "self_attn.v_proj.weight"])
        put(f"blk.{i}.attn_output.weight", hf[p + "self_attn.o_proj.weight"])
        put(f"blk.{i}.attn_norm.weight", hf[p + "input_layernorm.weight"])
        put(f"blk.{i}.ffn_norm.weight", hf[p + "post_attention_layernorm.weight"])
        put(f"blk.{i}.ffn_gate_inp.weight", hf[p + "block_sparse_moe.gate.weight"])
        for ours, theirs in (("gate", "w1"), ("down", "w2"), ("up", "w3")):
            mats = [hf[p + f"block_sparse_moe.experts.{e}.{theirs}.weight"] for e in range(n_exp)]
            if stacked:
                put(f"blk.{i}.ffn_{ours}_exps.weight", np.stack(mats))
            else:
                for e, m in enumerate(mats):
                    put(f"blk.{i}.ffn_{ours}.{e}.weight", m)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_hf_directory_logits_and_shapes():
    ids, logits = _expected()
    loaded = load_model(str(FIX), "float32")
    c = loaded.config
    assert isinstance(c, MixtralConfig) and (c.n_experts, c.top_k) == (4, 2)
    flat = tree.flatten(loaded.params)
    assert flat["layers/0/moe/experts/gate/w"].shape == (4, 32, 64)
    assert flat["layers/0/moe/experts/down/w"].shape == (4, 64, 32)
    assert flat["layers/0/moe/router/w"].shape == (32, 4)
    out, _, _ = loaded.model.forward(loaded.params, jnp.asarray(ids, jnp.int32))
    np.testing.assert_allclose(np.asarray(out), logits, atol=1e-4, rtol=0)


def test_hf_fused_expert_layout(tmp_path):
    """transformers' in-memory names (mlp.gate, experts.gate_up_proj / down_proj) load the same."""
    from safetensors.numpy import save_file

    cfg = json.loads((FIX / "config.json").read_text())
    hf = read_safetensors(FIX / "model.safetensors")
    out = {}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        g = [hf.pop(p + f"block_sparse_moe.experts.{e}.w1.weight") for e in range(4)]
        u = [hf.pop(p + f"block_sparse_moe.experts.{e}.w3.weight") for e in range(4)]
        d = [hf.pop(p + f"block_sparse_moe.experts.{e}.w2.weight") for e in range(4)]
        out[p + "mlp.experts.gate_up_proj"] = np.concatenate([np.stack(g), np.stack(u)], axis=1)
        out[p + "mlp.experts.down_proj"] = np.stack(d)
        out[p + "mlp.gate.weight"] = hf.pop(p + "block_sparse_moe.gate.weight")
    out.update(hf)
    save_file(out, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ids, logits = _expected()
    loaded = load_model(str(tmp_path), "float32")
    res, _, _ = loaded.model.forward(loaded.params, jnp.asarray(ids, jnp.int32))
    np.testing.assert_allclose(np.asarray(res), logits, atol=1e-4, rtol=0)


def test_hf_missing_expert_is_named(tmp_path):
    from safetensors.numpy import save_file

    hf = read_safetensors(FIX / "model.safetensors")
    del hf["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(hf, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((FIX / "config.json").read_text())
    with pytest.raises(FlashitError, match=r"layers/1/moe/experts/up/w lacks experts \[2\]"):
        load_model(str(tmp_path))


def test_hf_top_k_above_experts(tmp_path):
    cfg = json.loads((FIX / "config.json").read_text())
    cfg["num_experts_per_tok"] = 5
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").write_bytes((FIX / "model.safetensors").read_bytes())
    with pytest.raises(FlashitError, match=r"top_k \(5\) exceeds the number of experts \(4\)"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("stacked", [True, False], ids=["stacked", "per-expert"])
def test_gguf_logits(tmp_path, stacked):
    pytest.importorskip("gguf")
    path = write_mixtral_gguf(tmp_path / "tiny-mixtral.gguf", stacked=stacked)
    loaded = load_model(str(path), "float32")
    assert isinstance(loaded.config, MixtralConfig)
    assert (loaded.config.n_experts, loaded.config.top_k, loaded.config.ffn_dim) == (4, 2, 64)
    assert loaded.tokenizer is not None
    ids, logits = _expected()
    out, _, _ = loaded.model.forward(loaded.params, jnp.asarray(ids, jnp.int32))
    np.testing.assert_allclose(np.asarray(out), logits, atol=1e-4, rtol=0)


def test_gguf_f16_experts_close(tmp_path):
    """F16-stored experts dequantize to within F16 rounding of the HF logits."""
    pytest.importorskip("gguf")
    path = write_mixtral_gguf(tmp_path / "tiny-mixtral-f16.gguf", dtype=np.float16)
    loaded = load_model(str(path), "float32")
    ids, logits = _expected()
    out, _, _ = loaded.model.forward(loaded.params, jnp.asarray(ids, jnp.int32))
    err = np.abs(np.asarray(out) - logits).max()
    assert 0 < err < 5e-2 * np.abs(logits).max()

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flashit_jax import tree
from flashit_jax.loading import load_model, save_model
from models import Model
from models.llama import LlamaConfig

CFG = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, qkv_bias=True,
                  sliding_window=7, family="qwen2")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_is_exact(tmp_path, dtype):
    m = Model(CFG)
    params = m.init_params(jax.random.key(3), jnp.dtype(dtype).type)
    transforms = [{"name": "test", "recipe": [["layers/.*", "noop"]]}]
    save_model(tmp_path, CFG, params, transforms=transforms)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["format_version"] == 1
    loaded = load_model(str(tmp_path), dtype)
    assert loaded.config == CFG
    assert loaded.transforms == transforms
    a, b = tree.flatten(params), tree.flatten(loaded.params)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(np.asarray(a[k]), np.asarray(b[k])), k


def test_round_trip_keeps_tokenizer(tmp_path):
    from flashit_jax.loading import load_tokenizer
    from flashit_jax.loading.tokenizer import Tokenizer

    from tokenizers import Tokenizer as HFTok, models, pre_tokenizers

    tok = HFTok(models.BPE(vocab={"a": 0, "b": 1, "ab": 2, "<s>": 3}, merges=[("a", "b")]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    ours = Tokenizer(tok, bos_id=3, eos_id=None, add_bos=True)
    save_model(tmp_path, CFG, Model(CFG).init_params(jax.random.key(0)), tokenizer=ours)
    back = load_tokenizer(str(tmp_path))
    assert back.encode("ab a") == [3, 2, 0] == ours.encode("ab a")
    assert back.decode([2, 0]) == ours.decode([2, 0])

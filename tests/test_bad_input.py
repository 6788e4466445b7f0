"""Bad input gets one clear message naming the problem; CLIs print it without a traceback."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import FIXTURES

from flashit_jax import FlashitError
from flashit_jax.data import load_documents
from flashit_jax.loading import load_model


def _write_gguf(path, tensors, arch="llama"):
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_context_length(128)
    w.add_token_list([f"<t{i}>" for i in range(96)])
    w.add_tokenizer_model("gpt2")
    for name, arr, qt in tensors:
        w.add_tensor(name, arr, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_unknown_model_name_lists_known():
    with pytest.raises(FlashitError, match=r"unknown model 'smollm9'.*smollm2-135m.*random:llama-3.2-1b"):
        load_model("smollm9")
    with pytest.raises(FlashitError, match="unknown model shape 'nope'"):
        load_model("random:nope")


def test_truncated_and_corrupt_gguf(tmp_path):
    good = tmp_path / "good.gguf"
    _write_gguf(good, [("token_embd.weight", np.ones((96, 32), np.float32), None)])
    data = good.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(FlashitError, match=r"cut\.gguf.*(corrupt or truncated|truncated)"):
        load_model(str(tmp_path / "cut.gguf"))
    (tmp_path / "junk.gguf").write_bytes(b"NOTAGGUF" + data[8:])
    with pytest.raises(FlashitError, match=r"junk\.gguf: not a readable GGUF"):
        load_model(str(tmp_path / "junk.gguf"))


def test_unsupported_tensor_type(tmp_path):
    import gguf

    qt = gguf.GGMLQuantizationType.IQ4_NL
    raw = np.zeros((96, 18), np.uint8)  # IQ4_NL: 18 bytes per 32 values
    path = tmp_path / "iq.gguf"
    _write_gguf(path, [("token_embd.weight", raw, qt)])
    with pytest.raises(FlashitError, match=r"token_embd\.weight.*unsupported type IQ4_NL"):
        load_model(str(path))


def test_config_weights_mismatch(tmp_path):
    d = tmp_path / "hf"
    shutil.copytree(FIXTURES / "parity" / "llama", d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FlashitError, match=r"weights do not match the config.*mlp/(down|gate|up)/w.*\(32, 64\).*128"):
        load_model(str(d))


def test_unsupported_architecture(tmp_path):
    d = tmp_path / "hf"
    shutil.copytree(FIXTURES / "parity" / "llama", d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["FalconForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FlashitError, match="unsupported architecture.*Falcon"):
        load_model(str(d))


def test_empty_corpus(tmp_path):
    (tmp_path / "empty.jsonl").write_text('{"text": "   "}\n')
    with pytest.raises(FlashitError, match="no non-empty documents"):
        load_documents(str(tmp_path / "empty.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"title": "x"}\n')
    with pytest.raises(FlashitError, match=r"bad\.jsonl:1: each line needs a string field 'text'"):
        load_documents(str(tmp_path / "bad.jsonl"))
    with pytest.raises(FlashitError, match="no such file"):
        load_documents(str(tmp_path / "missing.jsonl"))


@pytest.mark.parametrize("args,message", [
    (["-m", "eval.perplexity", "--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["-m", "eval.perplexity", "--model", "random:smollm2-135m"], "no tokenizer"),
])
def test_cli_prints_message_not_traceback(args, message):
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_foreign_kernels_package_first_on_the_path_is_named(tmp_path):
    """Hugging Face's `kernels` (a transformers >= 5.25 dependency) shadows our `kernels/` when it
    comes first on sys.path: importing flashit_jax says so instead of failing later."""
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", "import flashit_jax"], cwd=tmp_path, capture_output=True, text=True,
                       env={"PYTHONPATH": f"{tmp_path}:{repo}", "PATH": "/usr/bin:/bin"})
    assert r.returncode != 0
    assert "Hugging Face's `kernels`" in r.stderr and str(tmp_path / "kernels") in r.stderr
    ok = subprocess.run([sys.executable, "-c", "import flashit_jax, kernels; print(kernels.__file__)"], cwd=repo,
                        capture_output=True, text=True, env={"PYTHONPATH": str(repo), "PATH": "/usr/bin:/bin"})
    assert ok.returncode == 0 and ok.stdout.strip() == str(repo / "kernels" / "__init__.py")

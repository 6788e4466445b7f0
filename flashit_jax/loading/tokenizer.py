"""Tokenizers built with the `tokenizers` library from GGUF metadata or tokenizer.json.

BOS is added exactly where llama.cpp and transformers add it (`add_bos`); EOS never is.
"""
from __future__ import annotations

import json
from pathlib import Path

from flashit_jax.errors import FlashitError

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
# llama.cpp's pre-tokenizer regexes (llama-vocab.cpp), applied in sequence, by `tokenizer.ggml.pre`.
PRE_TOKENIZERS: dict[str, list[str]] = {
    "default": [_GPT2],
    "gpt2": [_GPT2],
    "smollm": [r"\p{N}", _GPT2],
    "starcoder": [r"\p{N}", _GPT2],
    "refact": [r"\p{N}", _GPT2],
    "llama-bpe": [
        r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "qwen2": [
        r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
}
PRE_TOKENIZERS["llama3"] = PRE_TOKENIZERS["llama-bpe"]

# llama.cpp token types
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the BOS/EOS conventions of the model it came with."""

    def __init__(self, tok, *, bos_id: int | None, eos_id: int | None, add_bos: bool):
        self.tok = tok
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.add_bos = add_bos

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def encode_batch(self, texts: list[str], add_bos: bool | None = None) -> list[list[int]]:
        encs = self.tok.encode_batch(texts, add_special_tokens=False)
        bos = (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None
        return [([self.bos_id] if bos else []) + e.ids for e in encs]

    def decode(self, ids, skip_special: bool = True) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)


def _special_tokens(tokens, types) -> list:
    from tokenizers import AddedToken

    return [AddedToken(t, special=True, normalized=False)
            for t, ty in zip(tokens, types) if ty in (_CONTROL, _USER_DEFINED)]


def _bpe_from_gguf(tokens, types, merges, pre: str):
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    if pre not in PRE_TOKENIZERS:
        raise FlashitError(f"unsupported GGUF pre-tokenizer {pre!r}; supported: {sorted(PRE_TOKENIZERS)}")
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZERS[pre]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(_special_tokens(tokens, types))
    return tok


def _spm_from_gguf(tokens, types, scores, add_space_prefix: bool):
    """SentencePiece-style BPE (llama 1/2, Mistral): merges ranked by the merged piece's score."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, normalizers

    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for piece, i in vocab.items():
        if types[i] not in (_NORMAL, _USER_DEFINED) or len(piece) < 2:
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                merges.append((scores[i], i, left, right))
    merges.sort(key=lambda m: (-m[0], m[1]))
    unk = next((t for t, ty in zip(tokens, types) if ty == _UNKNOWN), None)
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[(l, r) for _, _, l, r in merges], unk_token=unk,
                                 fuse_unk=True, byte_fallback=True))
    norm = [normalizers.Replace(" ", "▁")]
    if add_space_prefix:
        norm.insert(0, normalizers.Prepend("▁"))
    tok.normalizer = normalizers.Sequence(norm)
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)
    tok.add_special_tokens(_special_tokens(tokens, types))
    return tok


def tokenizer_from_gguf(reader) -> Tokenizer:
    from flashit_jax.loading.gguf_file import field

    model = field(reader, "tokenizer.ggml.model")
    tokens = field(reader, "tokenizer.ggml.tokens")
    if not tokens:
        raise FlashitError("GGUF file has no tokenizer (tokenizer.ggml.tokens missing)")
    types = field(reader, "tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    if model == "gpt2":
        merges = field(reader, "tokenizer.ggml.merges") or []
        tok = _bpe_from_gguf(tokens, types, merges, field(reader, "tokenizer.ggml.pre", "default") or "default")
        add_bos_default = False
    elif model == "llama":
        scores = field(reader, "tokenizer.ggml.scores") or [0.0] * len(tokens)
        tok = _spm_from_gguf(tokens, types, scores, bool(field(reader, "tokenizer.ggml.add_space_prefix", True)))
        add_bos_default = True
    else:
        raise FlashitError(f"unsupported GGUF tokenizer model {model!r} (supported: gpt2, llama)")
    add_bos = field(reader, "tokenizer.ggml.add_bos_token")
    return Tokenizer(tok, bos_id=field(reader, "tokenizer.ggml.bos_token_id"),
                     eos_id=field(reader, "tokenizer.ggml.eos_token_id"),
                     add_bos=add_bos_default if add_bos is None else bool(add_bos))


def tokenizer_from_dir(path: Path) -> Tokenizer | None:
    """tokenizer.json (+ tokenizer_config.json for BOS/EOS) in an HF or our model directory."""
    from tokenizers import Tokenizer as HFTokenizer

    tj = path / "tokenizer.json"
    if not tj.exists():
        return None
    try:
        tok = HFTokenizer.from_file(str(tj))
    except Exception as e:
        raise FlashitError(f"{tj}: cannot parse tokenizer.json: {e}") from None
    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}

    def token_id(key):
        v = cfg.get(key)
        if isinstance(v, dict):
            v = v.get("content")
        return None if v is None else tok.token_to_id(v)

    bos, eos = token_id("bos_token"), token_id("eos_token")
    if "add_bos_token" in cfg:
        add_bos = bool(cfg["add_bos_token"])
    else:  # whatever the post-processor does, as transformers would
        with_special = tok.encode("a", add_special_tokens=True).ids
        add_bos = bos is not None and len(with_special) > 0 and with_special[0] == bos
    return Tokenizer(tok, bos_id=bos, eos_id=eos, add_bos=add_bos)

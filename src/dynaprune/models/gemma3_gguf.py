"""Reading a llama.cpp ``gemma3`` GGUF: the configuration, the fp32 weights under ``models/gemma3.py``'s
names, and the tokenizer built from the file's own vocabulary, scores and token types.

The tokenizer has SentencePiece BPE semantics (the ``llama`` tokenizer model of llama.cpp, Gemma's
``tokenizer.model``): spaces become U+2581, no dummy prefix; user-defined pieces are matched whole;
then adjacent symbols merge, the pair whose merged piece scores highest first; characters outside the
vocabulary fall back to their UTF-8 bytes (``<0xNN>``); ``<bos>`` starts every sequence. It is built
with the ``tokenizers`` library (a BPE whose merges are ranked by the merged piece's score) and wrapped
in transformers' ``PreTrainedTokenizerFast``. transformers' own GGUF conversion of this file is broken
(no merges: " capital" becomes " c", "ap", "it", "al"; and no BOS), hence this.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFValueType

from dynaprune.errors import DynapruneError
from dynaprune.models.gguf_loader import _field, _open

# GGUF token types (llama.cpp's llama_token_type, SentencePiece's ModelProto.SentencePiece.Type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"

_NORMS = {"attn_norm": "attention_norm", "post_attention_norm": "post_attention_norm", "ffn_norm": "ffn_norm",
          "post_ffw_norm": "post_ffn_norm", "attn_q_norm": "attention.q_norm", "attn_k_norm": "attention.k_norm"}


def _tensor(t, path: Path) -> np.ndarray:
    from gguf.quants import dequantize

    shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists dims innermost first
    try:
        return np.require(dequantize(t.data, t.tensor_type), np.float32, ["C", "W"]).reshape(shape)
    except Exception as e:  # the reader raises many kinds on a damaged file
        raise DynapruneError(f"{path}: tensor {t.name} cannot be read, file corrupt or truncated "
                             f"({type(e).__name__}: {e})") from None


def gguf_architecture(path: Path) -> str | None:
    """``general.architecture`` of a GGUF from its first bytes (opening the reader parses the whole
    vocabulary: seconds); None when not found there."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    key = b"general.architecture"
    at = head.find(key)
    if head[:4] != b"GGUF" or at < 0 or len(head) < at + len(key) + 12:
        return None
    value_type, size = struct.unpack_from("<IQ", head, at + len(key))
    if value_type != GGUFValueType.STRING or size > 256:
        return None
    return head[at + len(key) + 12: at + len(key) + 12 + size].decode("utf-8", "replace")


def read_gemma3_gguf(path: Path) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """(``Gemma3Config`` fields, fp32 state dict under ``Gemma3``'s names, ``gguf_vocabulary``) of a
    ``gemma3`` GGUF."""
    reader = _open(path)
    arch = _field(reader, "general.architecture")
    if arch != "gemma3":
        raise DynapruneError(f"{path}: GGUF architecture {arch!r} is not gemma3")

    def need(key: str):
        v = _field(reader, f"gemma3.{key}")
        if v is None:
            raise DynapruneError(f"{path}: GGUF metadata lacks gemma3.{key}")
        return v

    head_dim = int(need("attention.key_length"))
    fields = dict(
        hidden=int(need("embedding_length")), layers=int(need("block_count")),
        heads=int(need("attention.head_count")), kv_heads=int(need("attention.head_count_kv")), head_dim=head_dim,
        intermediate=int(need("feed_forward_length")), rms_eps=float(need("attention.layer_norm_rms_epsilon")),
        rope_global=float(_field(reader, "gemma3.rope.freq_base", 1_000_000.0)),
        # not written by llama.cpp's converter: Gemma 3's constants unless the file says otherwise
        rope_local=float(_field(reader, "gemma3.rope.freq_base_swa", 10_000.0)),
        sliding_window=int(need("attention.sliding_window")),
        pattern=int(_field(reader, "gemma3.attention.sliding_window_pattern", 6)),
        query_scalar=float(_field(reader, "gemma3.attention.query_pre_attn_scalar", head_dim)),
        max_positions=int(_field(reader, "gemma3.context_length", 32768)),
        bos_id=int(_field(reader, "tokenizer.ggml.bos_token_id", 2)),
        eos_id=int(_field(reader, "tokenizer.ggml.eos_token_id", 1)),
    )
    raw = {t.name: t for t in reader.tensors}
    state: dict[str, torch.Tensor] = {}

    def take(name: str) -> np.ndarray:
        if name not in raw:
            raise DynapruneError(f"{path}: GGUF has no tensor {name}")
        return _tensor(raw.pop(name), path)

    def norm(name: str) -> torch.Tensor:  # llama.cpp stores Gemma's norm weights as 1 + w
        return torch.from_numpy(take(name) - np.float32(1.0))

    state["tok_embeddings.weight"] = torch.from_numpy(take("token_embd.weight"))
    state["norm.weight"] = norm("output_norm.weight")
    for i in range(fields["layers"]):
        b = f"blk.{i}."
        state[f"layers.{i}.attention.wqkv.weight"] = torch.from_numpy(
            np.concatenate([take(b + f"attn_{x}.weight") for x in "qkv"]))
        state[f"layers.{i}.attention.wo.weight"] = torch.from_numpy(take(b + "attn_output.weight"))
        state[f"layers.{i}.feed_forward.w13.weight"] = torch.from_numpy(
            np.concatenate([take(b + "ffn_gate.weight"), take(b + "ffn_up.weight")]))
        state[f"layers.{i}.feed_forward.w2.weight"] = torch.from_numpy(take(b + "ffn_down.weight"))
        for gguf_name, ours in _NORMS.items():
            state[f"layers.{i}.{ours}.weight"] = norm(b + gguf_name + ".weight")
    if raw:
        raise DynapruneError(f"{path}: unexpected GGUF tensors, e.g. {sorted(raw)[:3]} (an untied output?)")
    fields["vocab"] = state["tok_embeddings.weight"].shape[0]
    return fields, state, gguf_vocabulary(path, reader)


def bpe_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """Every pair (left, right) of pieces whose concatenation is a normal piece, ranked as SentencePiece's
    BPE merges them: the merged piece's score, highest first (ties: lower id, then shorter left part)."""
    vocab = {t: i for i, t in enumerate(tokens) if types[i] in (NORMAL, USER_DEFINED)}
    found = []
    for piece, i in vocab.items():
        if types[i] != NORMAL:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                found.append((-scores[i], i, cut, left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


def build_tokenizer(tokens: list[str], scores: list[float], types: list[int], *, bos_id: int, eos_id: int,
                    unk_id: int, pad_id: int | None = None):
    """A transformers ``PreTrainedTokenizerFast`` with SentencePiece BPE semantics (module docstring)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    if not (len(tokens) == len(scores) == len(types)):
        raise DynapruneError(f"GGUF vocabulary: {len(tokens)} tokens, {len(scores)} scores, {len(types)} types")
    # llama.cpp writes user-defined pieces with plain spaces; SentencePiece holds them escaped, as text is
    tokens = [t.replace(" ", SPACE) if k == USER_DEFINED else t for t, k in zip(tokens, types, strict=True)]
    vocab = {t: i for i, t in enumerate(tokens)}
    model = models.BPE(vocab=vocab, merges=bpe_merges(tokens, scores, types), unk_token=tokens[unk_id],
                       byte_fallback=True, fuse_unk=True)
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Replace(" ", SPACE)
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    bos = tokens[bos_id]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                       special_tokens=[(bos, bos_id)])
    # control tokens are special (dropped on decode, never read from text: below); user-defined pieces are
    # matched whole in the text (SentencePiece's prefix matcher), on the text with spaces escaped
    tok.add_tokens([AddedToken(t, normalized=True, special=False) for t, k in zip(tokens, types, strict=True)
                    if k == USER_DEFINED])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, types, strict=True)
                            if k in (CONTROL, UNKNOWN)])
    # SentencePiece reads control tokens in the text as text (WikiText-2's literal "<unk>" stays "<", "unk", ">")
    tok.encode_special_tokens = True
    pad = tokens[pad_id] if pad_id is not None else None
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=tokens[eos_id],
                                   unk_token=tokens[unk_id], pad_token=pad, add_bos_token=True,
                                   split_special_tokens=True)


def _array(reader, key: str) -> list | None:
    """A GGUF array field as a list, read from its raw parts (``contents()`` takes seconds on 262k items)."""
    f = reader.fields.get(key)
    if f is None:
        return None
    items = [f.parts[i] for i in f.data]
    if items and f.types[-1] == GGUFValueType.STRING:
        return [bytes(x).decode("utf-8") for x in items]
    return np.concatenate(items).tolist() if items else []


def gguf_vocabulary(path: Path, reader=None) -> dict:
    """``build_tokenizer``'s arguments from a GGUF's ``tokenizer.ggml.*`` metadata."""
    reader = reader or _open(path)
    if _field(reader, "tokenizer.ggml.model") != "llama":
        raise DynapruneError(f"{path}: tokenizer model {_field(reader, 'tokenizer.ggml.model')!r} is not "
                             "SentencePiece ('llama')")
    if _field(reader, "tokenizer.ggml.add_space_prefix", False):
        raise DynapruneError(f"{path}: a tokenizer with a dummy space prefix is not supported")
    out = {"tokens": _array(reader, "tokenizer.ggml.tokens"), "scores": _array(reader, "tokenizer.ggml.scores"),
           "types": _array(reader, "tokenizer.ggml.token_type")}
    if any(v is None for v in out.values()):
        raise DynapruneError(f"{path}: GGUF lacks the tokenizer's tokens, scores or token types")
    out.update(bos_id=int(_field(reader, "tokenizer.ggml.bos_token_id")),
               eos_id=int(_field(reader, "tokenizer.ggml.eos_token_id")),
               unk_id=int(_field(reader, "tokenizer.ggml.unknown_token_id", 3)),
               pad_id=_field(reader, "tokenizer.ggml.padding_token_id"))
    return out


@dataclass
class GemmaTokenizerLoader:
    """The GGUF's tokenizer, built on first use (the merges of 262k pieces take seconds)."""

    vocabulary: dict  # gguf_vocabulary()

    def load(self):
        return build_tokenizer(**self.vocabulary)

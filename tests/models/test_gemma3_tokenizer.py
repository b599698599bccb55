"""The Gemma 3 tokenizer built from the GGUF's vocabulary, scores and token types (models/gemma3_gguf.py),
against SentencePiece itself fed the same pieces (the reference implementation of these semantics), on
WikiText-2 lines; BOS; known pieces; and the real model's greedy answer about France's capital."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dynaprune.models.gemma3_gguf import CONTROL, SPACE, USER_DEFINED, build_tokenizer, gguf_vocabulary
from dynaprune.models.registry import cached_path


@pytest.fixture(scope="module")
def vocabulary():
    path = cached_path("gemma3-270m")
    if path is None:
        pytest.skip("gemma3-270m is not fetched (dynaprune fetch gemma3-270m)")
    return gguf_vocabulary(Path(path))


@pytest.fixture(scope="module")
def tok(vocabulary):
    return build_tokenizer(**vocabulary)


@pytest.fixture(scope="module")
def sentencepiece(vocabulary):
    spm = pytest.importorskip("sentencepiece")
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    for piece, score, kind in zip(vocabulary["tokens"], vocabulary["scores"], vocabulary["types"], strict=True):
        p = proto.pieces.add()
        p.piece, p.score, p.type = (piece.replace(" ", SPACE) if kind == USER_DEFINED else piece), score, kind
    proto.trainer_spec.model_type = pb.TrainerSpec.BPE
    proto.trainer_spec.byte_fallback = True
    proto.trainer_spec.unk_id, proto.trainer_spec.bos_id = vocabulary["unk_id"], vocabulary["bos_id"]
    proto.trainer_spec.eos_id, proto.trainer_spec.pad_id = vocabulary["eos_id"], vocabulary["pad_id"]
    n = proto.normalizer_spec
    n.name, n.add_dummy_prefix, n.remove_extra_whitespaces, n.escape_whitespaces = "identity", False, False, True
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


def _lines(shared_data: Path, n: int) -> list[str]:
    text = (shared_data / "wikitext2" / "valid.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()][:n]


@pytest.mark.models
def test_equals_sentencepiece_and_round_trips_on_wikitext2(tok, sentencepiece, shared_data):
    lines = _lines(shared_data, 400)
    odd = ["  two  spaces\n\nand lines", "naïve café – 日本語 🙂", "\tTab\u00a0nbsp", "<start_of_turn>user"]
    for line in lines + odd:
        ids = tok(line, add_special_tokens=False).input_ids
        assert ids == sentencepiece.encode(line), line
        assert tok.decode(ids) == line
    whole = "\n".join(lines)
    assert tok(whole, add_special_tokens=False).input_ids == sentencepiece.encode(whole)


@pytest.mark.models
def test_bos_and_known_pieces(tok, vocabulary):
    ids = tok("The capital of France is").input_ids
    assert ids[0] == vocabulary["bos_id"] == 2
    assert tok.convert_ids_to_tokens(ids[1:]) == ["The"] + [SPACE + w for w in ("capital", "of", "France", "is")]
    assert tok(" capital", add_special_tokens=False).input_ids == [tok.convert_tokens_to_ids(f"{SPACE}capital")]
    assert tok.convert_ids_to_tokens(tok("\n\n", add_special_tokens=False).input_ids) == ["\n\n"]  # user-defined
    control = next(t for t, k in zip(vocabulary["tokens"], vocabulary["types"], strict=True) if k == CONTROL)
    assert tok.decode(tok("hi").input_ids + [tok.convert_tokens_to_ids(control)], skip_special_tokens=True) == "hi"
    assert tok.eos_token_id == vocabulary["eos_id"] == 1


@pytest.fixture(scope="module")
def gemma():
    if cached_path("gemma3-270m") is None:
        pytest.skip("gemma3-270m is not fetched (dynaprune fetch gemma3-270m)")
    import dynaprune

    return dynaprune.load("gemma3-270m")


def _greedy(model, prompt: str, n: int) -> str:
    tok = model.tokenizer
    ids = torch.tensor([tok(prompt).input_ids])
    cache = model.new_cache(1, ids.shape[1] + n)
    with torch.inference_mode():
        logits = model(ids, cache=cache)[0, -1]
        out = []
        for _ in range(n):
            out.append(int(logits.argmax()))
            logits = model(torch.tensor([[out[-1]]]), cache=cache)[0, -1]
    return tok.decode(out)


@pytest.mark.models
@pytest.mark.slow
def test_capital_of_france_names_paris(gemma):
    # This base model (Q4_K_M) continues the bare prompt with " the capital of the country of France. It is
    # the largest city in France ..." (Paris is its third most likely next token); asked as a question, it
    # answers Paris. Both are checked, so a broken tokenizer or model fails either way.
    tok = gemma.tokenizer
    with torch.inference_mode():
        top = gemma(torch.tensor([tok("The capital of France is").input_ids]))[0, -1].topk(3).indices.tolist()
    assert tok.convert_tokens_to_ids(f"{SPACE}Paris") in top
    assert "Paris" in _greedy(gemma, "Q: What is the capital of France?\nA:", 8)

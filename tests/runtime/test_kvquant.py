"""The packed KV cache (runtime/kvquant.py + KVCache hooks) and the one K/V bytes axis (runtime/cost.py):
against the quantize-dequantize reference, fp, and hand counts."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dynaprune.models.llama import Llama, LlamaConfig
from dynaprune.prune.groupquant import KVQuantSpec, fake_quantize_kv
from dynaprune.runtime.kvcache import KVCache
from dynaprune.runtime.pruning import make_context


class _CharTokenizer:
    def __call__(self, text, add_special_tokens=True):
        return SimpleNamespace(input_ids=[ord(ch) % 64 for ch in text])


def _model(head_dim: int = 8) -> Llama:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab=64, hidden=32, layers=2, heads=4, kv_heads=2, head_dim=head_dim, intermediate=48, max_positions=256
    )
    return Llama(cfg, tokenizer=_CharTokenizer(), name="tiny").eval()


def _kv(t: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, t, 16, generator=g), torch.randn(2, 3, t, 16, generator=g)


def test_packed_cache_reads_the_fake_quantized_reference_exactly() -> None:
    spec = KVQuantSpec(3, 5, 8, 4)
    cache = KVCache(1, 2, 3, 16, 64)
    k, v = _kv(40)
    cache.update(0, k[:, :, :37], v[:, :, :37])
    cache.pack_prefix(0, 32, spec)
    assert torch.isnan(cache.k[0][:, :, :32]).all()  # the fp copies are gone: only the packed form is read
    got_k, got_v = cache.update(0, k[:, :, 37:], v[:, :, 37:])
    ref_k, ref_v = fake_quantize_kv(k[:, :, :32], v[:, :, :32], spec)
    assert torch.equal(got_k, torch.cat([ref_k, k[:, :, 32:]], 2))
    assert torch.equal(got_v, torch.cat([ref_v, v[:, :, 32:]], 2))
    # appending a second block packs it on its own: the first block's codes are unchanged
    cache.pack_prefix(0, 40, spec)
    got_k, _ = cache.update(0, k[:, :, :1], v[:, :, :1])
    ref_k2, _ = fake_quantize_kv(k[:, :, 32:40], v[:, :, 32:40], spec)
    assert torch.equal(got_k[:, :, :40], torch.cat([ref_k, ref_k2], 2))


def test_compact_unpacks_then_gathers() -> None:
    spec = KVQuantSpec(4, 4, 8, 16)
    cache = KVCache(1, 2, 3, 16, 64)
    k, v = _kv(20, seed=1)
    cache.update(0, k, v)
    cache.pack_prefix(0, 16, spec)
    keep = torch.tensor([[0, 3, 17, 19], [1, 2, 5, 18]])
    cache.compact(0, keep)
    ref_k, ref_v = fake_quantize_kv(k[:, :, :16], v[:, :, :16], spec)
    full_k, full_v = torch.cat([ref_k, k[:, :, 16:]], 2), torch.cat([ref_v, v[:, :, 16:]], 2)
    idx = keep[:, None, :, None].expand(-1, 3, -1, 16)
    assert cache.packed[0] is None and cache.lengths[0] == 4
    assert torch.equal(cache.k[0][:, :, :4], full_k.gather(2, idx))
    assert torch.equal(cache.v[0][:, :, :4], full_v.gather(2, idx))


def test_bytes_held_hand_count() -> None:
    cache = KVCache(2, 2, 3, 16, 64)  # fp32 buffers
    k, v = _kv(40, seed=2)
    for layer in range(2):
        cache.update(layer, k, v)
    cache.pack_prefix(0, 32, KVQuantSpec(4, 2, 16, 8))
    # layer 0: 32 packed tokens. K codes 2*3*32*16*4/8 = 1536 B; K scale+zero: 2*3 x 2 blocks x 16 channels x 2 x 2 B
    # = 768; V codes 2*3*32*16*2/8 = 768; V scale+zero 2*3*32 tokens x 2 groups x 2 x 2 B = 1536;
    # + 8 fp tokens x 2 (K, V) x 2*3*16 x 4 B = 6144. Layer 1: 40 fp tokens: 30720.
    assert cache.bytes_held() == 1536 + 768 + 768 + 1536 + 6144 + 30720
    # on the fp16 axis the fp tokens count 2 bytes an element
    assert cache.bytes_held(fp_bytes=2) == 1536 + 768 + 768 + 1536 + 3072 + 15360
    assert cache.dense_fp16_bytes() == 2 * 2 * 40 * 2 * 3 * 16 * 2


def _continuation(model: Llama, recipe: str, ids: torch.Tensor, context: int) -> torch.Tensor:
    ctx = make_context(recipe, model)
    cache = model.new_cache(1, ids.shape[1])
    with torch.inference_mode():
        model(ids[:, :context], cache=cache, ctx=ctx)
        return model(ids[:, context:], cache=cache, ctx=ctx)


def test_model_decode_on_packed_cache_equals_fake_quantized_context() -> None:
    model = _model()
    ids = torch.randint(0, 64, (1, 48), generator=torch.Generator().manual_seed(3))
    got = _continuation(model, "kv_bits=3,kv_group=8", ids, 40)
    # reference: a plain fp cache after the prompt, its K/V replaced by their quantize-dequantize
    cache = model.new_cache(1, 48)
    spec = KVQuantSpec(3, 3, 8, 8)
    with torch.inference_mode():
        model(ids[:, :40], cache=cache)
        for layer in range(2):
            ref_k, ref_v = fake_quantize_kv(cache.k[layer][:, :, :40], cache.v[layer][:, :, :40], spec)
            cache.k[layer][:, :, :40], cache.v[layer][:, :, :40] = ref_k, ref_v
        ref = model(ids[:, 40:], cache=cache)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    dense = _continuation(model, "", ids, 40)
    assert float((got - dense).abs().max()) > 1e-3  # 3 bits do change the logits: the test can fail


def test_sixteen_bits_match_fp() -> None:
    model = _model()
    ids = torch.randint(0, 64, (1, 48), generator=torch.Generator().manual_seed(4))
    got = _continuation(model, "kv_bits=16,kv_group=8", ids, 40)
    torch.testing.assert_close(got, _continuation(model, "", ids, 40), rtol=0, atol=1e-3)


def test_residual_window_stays_fp() -> None:
    model = _model()
    ctx = make_context("kv_bits=4,kv_group=8,kv_residual=12", model)
    cache = model.new_cache(1, 64)
    with torch.inference_mode():
        model(torch.randint(0, 64, (1, 45)), cache=cache, ctx=ctx)
    assert [p.tokens for p in cache.packed] == [32, 32]  # (45 - 12) // 8 * 8: whole key groups only


# ---------------------------------------------------------------------- the bytes axis, by hand
def _lm_cost(model: Llama, tmp_path, recipe: str, context: int, continuation: int = 8) -> dict:
    from dynaprune.cli import run_task

    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    result = run_task(
        "tiny",
        "lm",
        data=text,
        protocol="continue",
        context=context,
        continuation=continuation,
        max_examples=2,
        recipe=recipe,
        model=model,
    )
    return result.cost


def test_bytes_axis_eviction_alone(tmp_path) -> None:
    # kv=0.25 of a 40-token context: keep_count(0.25, 40) = 10 tokens (< 64: no eviction slack) of 40 read
    cost = _lm_cost(_model(), tmp_path, "kv=0.25", 40)
    assert cost["kv_bytes_vs_fp16"] == pytest.approx(10 / 40, abs=1e-12)
    assert cost["kv_bytes_kept"] > 0.3  # the old axis also counts the continuation's own keys
    # after the continuation forward (7 more tokens appended, then evicted back to 10 of 47)
    assert cost["kv_bytes_held_vs_fp16"] == pytest.approx(10 / 47, abs=1e-12)


def test_bytes_axis_four_bits_groups_of_64(tmp_path) -> None:
    # 128 context tokens, head_dim 64: a K element is 4 bits of code + its share of a fp16 scale and zero
    # per 64 tokens of a channel (32 / 64 bits); a V element 4 bits + 32 / 64 bits (per 64 channels of a
    # token) -> 4.5 / 16 = 0.28125 (transformers' quanto cache at 4 bits, groups of 64: "about 0.29")
    cost = _lm_cost(_model(head_dim=64), tmp_path, "kv_bits=4,kv_group=64", 128)
    assert cost["kv_bytes_vs_fp16"] == pytest.approx(4.5 / 16, abs=1e-12)
    # end: 135 tokens, 128 packed + 7 fp16
    assert cost["kv_bytes_held_vs_fp16"] == pytest.approx((128 * 4.5 / 16 + 7) / 135, abs=1e-12)
    dense = _lm_cost(_model(head_dim=64), tmp_path, "", 128)
    assert dense["kv_bytes_vs_fp16"] == 1.0


def test_bytes_axis_eviction_then_packing(tmp_path) -> None:
    # kv=0.5 of 80 tokens keeps 40 (< 64: no slack); 40 // 8 * 8 = 40 packed at 4 bits with groups of 8
    # (head_dim 8: a K element 4 + 32 / 8 bits, a V element 4 + 32 / 8 bits: 8 of 16 bits)
    cost = _lm_cost(_model(), tmp_path, "kv=0.5,kv_bits=4,kv_group=8", 80)
    assert cost["kv_bytes_vs_fp16"] == pytest.approx(40 * 8 / 16 / 80, abs=1e-12)
    # 100 context tokens, kv=0.7: budget 70 (the prompt evicts to exactly the budget; the slack is for
    # decode-time growth), 64 packed + 6 fp16
    cost = _lm_cost(_model(), tmp_path, "kv=0.7,kv_bits=4,kv_group=8", 100)
    assert cost["kv_bytes_vs_fp16"] == pytest.approx((64 * 8 / 16 + 6) / 100, abs=1e-12)


def test_read_copy_reads_exactly_what_dequantizing_reads(monkeypatch) -> None:
    """KEEP_READ_COPY (CPU accuracy runs): blocks packed in two appends, 8-bit scales and rotation, read
    back bit-identical to dequantizing the packed form; the bytes held are the packed form's either way."""
    from dynaprune.runtime import kvquant

    spec = KVQuantSpec(3, 2, 8, 8, scale_bits=8, rotate="kv")
    k, v = _kv(40, seed=3)
    reads, held = [], []
    for copy in (False, True):
        monkeypatch.setattr(kvquant, "KEEP_READ_COPY", copy)
        cache = KVCache(1, 2, 3, 16, 64)
        cache.update(0, k[:, :, :36], v[:, :, :36])
        cache.pack_prefix(0, 16, spec)
        cache.pack_prefix(0, 32, spec)
        assert (cache.packed[0].read_copy is not None) == copy
        reads.append(cache.update(0, k[:, :, 36:], v[:, :, 36:]))
        held.append(cache.bytes_held(fp_bytes=2))
    assert torch.equal(reads[0][0], reads[1][0]) and torch.equal(reads[0][1], reads[1][1])
    assert held[0] == held[1]

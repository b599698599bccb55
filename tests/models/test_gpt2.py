"""GPT-2 decoder: dense equivalence with transformers on random-weight checkpoints."""

from __future__ import annotations

import pytest
import torch
import transformers

from dynaprune.errors import DynapruneError
from dynaprune.models.gpt2 import GPT2, GPT2Config

TOL = 1e-4
SMALL = dict(vocab_size=150, n_positions=64, n_embd=48, n_layer=3, n_head=4)


def save_random(tmp_path, **extra):
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**SMALL, **extra)).eval()
    with torch.no_grad():  # random biases and LayerNorm affines, so a mis-mapped tensor cannot hide
        for name, p in hf.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.normal_(0, 0.3).add_(1.0 if name.endswith("weight") else 0.0)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    return hf


def left_pad(seqs):
    n = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), n, dtype=torch.long)
    mask = torch.zeros(len(seqs), n, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, n - len(s):], mask[i, n - len(s):] = torch.tensor(s), True
    return ids, mask, (mask.long().cumsum(1) - 1).clamp(min=0)


@pytest.mark.parametrize("extra", [{}, {"scale_attn_by_inverse_layer_idx": True, "activation_function": "gelu"},
                                   {"n_inner": 80, "activation_function": "relu"}],
                         ids=["default", "layer-scaled-gelu", "n_inner-relu"])
def test_random_gpt2_matches_transformers(tmp_path, extra):
    hf = save_random(tmp_path, **extra)
    ours = GPT2.from_hf_folder(tmp_path)
    assert ours.n_params() == sum(p.numel() for p in hf.parameters())
    assert ours.lm_head.weight is ours.wte.weight
    torch.manual_seed(1)
    ids = torch.randint(0, 150, (2, 33))
    pids, mask, pos = left_pad([list(range(5, 38)), list(range(11))])
    with torch.inference_mode():
        assert (ours(ids) - hf(ids).logits).abs().max() <= TOL
        a = ours(pids, attention_mask=mask)
        b = hf(pids, attention_mask=mask.long(), position_ids=pos).logits
        assert (a - b)[mask].abs().max() <= TOL


def test_gpt2_kv_cache_decode_equals_full_forward(tmp_path):
    save_random(tmp_path)
    model = GPT2.from_hf_folder(tmp_path)
    torch.manual_seed(3)
    seqs = [torch.randint(0, 150, (n,)).tolist() for n in (20, 9)]
    ids, mask, _ = left_pad(seqs)
    with torch.inference_mode():
        cache = model.new_cache(2, 24)
        model(ids[:, :-4], cache=cache, attention_mask=mask[:, :-4])
        decoded = torch.cat([model(ids[:, i : i + 1], cache=cache) for i in range(16, 20)], dim=1)
        for r, s in enumerate(seqs):
            assert (decoded[r] - model(torch.tensor([s]))[0, -4:]).abs().max() <= TOL
    assert cache.next_position.tolist() == [20, 9]


def test_gpt2_greedy_generate_matches_transformers(tmp_path):
    hf = save_random(tmp_path)
    model = GPT2.from_hf_folder(tmp_path)
    prompt = [5, 17, 99, 3, 42]
    res = model.generate(prompt, max_new_tokens=20, stop_tokens=[])
    with torch.inference_mode():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                          pad_token_id=0, attention_mask=torch.ones(1, 5, dtype=torch.long))
    assert res.new_ids == out[0, 5:].tolist()
    assert res.stop_reason == "max_new_tokens" and res.text == ""  # no tokenizer: ids only


def test_gpt2_untied_head_and_legacy_names(tmp_path):
    hf = save_random(tmp_path, tie_word_embeddings=False)
    state = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items()}  # old-style names
    state["h.0.attn.bias"] = torch.ones(1, 1, 64, 64)  # causal-mask buffer of old checkpoints
    model = GPT2.from_hf_state(GPT2Config.from_hf(hf.config.to_dict()), state)
    assert model.lm_head.weight is not model.wte.weight
    ids = torch.randint(0, 150, (1, 12))
    with torch.inference_mode():
        assert (model(ids) - hf(ids).logits).abs().max() <= TOL


def test_gpt2_bad_input(tmp_path):
    with pytest.raises(DynapruneError, match="activation"):
        GPT2Config.from_hf(dict(SMALL, model_type="gpt2", activation_function="swish_glu"))
    with pytest.raises(DynapruneError, match="not GPT-2"):
        GPT2Config.from_hf({"model_type": "llama"})
    save_random(tmp_path)
    model = GPT2.from_hf_folder(tmp_path)
    with pytest.raises(DynapruneError, match="exceeds the model's maximum of 64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 10)  # corrupt weights
    with pytest.raises(DynapruneError, match="corrupt"):
        GPT2.from_hf_folder(tmp_path)

"""from_transformers / to_transformers: weights shared (data_ptr), outputs equal to transformers' own."""

from __future__ import annotations

import pytest
import torch
import transformers

from dynaprune.errors import DynapruneError
from dynaprune.integrations.hf import from_transformers, to_transformers

TOL = 1e-4
LLAMA_SMALL = dict(vocab_size=120, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def randomize(hf):
    """Random biases / norm affines, so a mis-mapped tensor cannot hide behind an init of ones or zeros."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name.lower() or "ln_" in name or name.endswith("bias"):
                p.normal_(0, 0.3).add_(1.0 if name.endswith("weight") else 0.0)
    return hf.eval()


def small(family: str):
    torch.manual_seed(0)
    if family == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=120, n_positions=64, n_embd=32, n_layer=2, n_head=4)
        return randomize(transformers.GPT2LMHeadModel(cfg))
    if family == "bert":
        cfg = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=48, max_position_embeddings=64)
        return randomize(transformers.BertModel(cfg, add_pooling_layer=False))
    if family == "llama":
        return randomize(transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA_SMALL)))
    if family == "mistral":
        cfg = transformers.MistralConfig(**LLAMA_SMALL, sliding_window=None)
        return randomize(transformers.MistralForCausalLM(cfg))
    if family == "qwen2":
        return randomize(transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**LLAMA_SMALL,
                                                                               tie_word_embeddings=True)))
    raise AssertionError(family)


def max_diff(ours, hf, family: str, ids: torch.Tensor) -> float:
    with torch.no_grad():
        if family == "bert":
            states, _ = ours(ids)
            return (states - hf(ids).last_hidden_state).abs().max().item()
        return (ours(ids) - hf(ids).logits).abs().max().item()


FAMILIES = ["bert", "gpt2", "llama", "mistral", "qwen2"]


@pytest.mark.parametrize("family", FAMILIES)
def test_small_random_model_equivalent_and_shared(family):
    hf = small(family)
    ids = torch.randint(0, 120, (2, 11))
    with torch.no_grad():
        before = (hf(ids).last_hidden_state if family == "bert" else hf(ids).logits).clone()
    ours = from_transformers(hf)
    assert max_diff(ours, hf, family, ids) <= TOL
    with torch.no_grad():  # re-pointing HF's projections at our fused tensors did not change HF's output
        after = hf(ids).last_hidden_state if family == "bert" else hf(ids).logits
    assert (after - before).abs().max().item() == 0.0
    # every transformers parameter's storage lies inside one of ours: nothing was copied
    ours_spans = [(p.data_ptr(), p.data_ptr() + p.numel() * p.element_size()) for p in ours.parameters()]
    for name, p in hf.named_parameters():
        assert any(lo <= p.data_ptr() < hi for lo, hi in ours_spans), name
    # an edit through transformers is seen by ours (shared storage, not a snapshot)
    with torch.no_grad():
        next(p for n, p in hf.named_parameters() if "layer" in n or ".h." in n).mul_(1.5)
    assert max_diff(ours, hf, family, ids) <= TOL
    back = to_transformers(ours)
    assert max_diff(ours, back, family, ids) <= TOL


def test_fused_projection_pointers():
    hf = small("llama")
    ours = from_transformers(hf)
    attn, wqkv = hf.model.layers[1].self_attn, ours.layers[1].attention.wqkv.weight
    assert attn.q_proj.weight.data_ptr() == wqkv.data_ptr()
    assert attn.k_proj.weight.data_ptr() == wqkv[attn.q_proj.weight.shape[0]:].data_ptr()
    assert hf.model.embed_tokens.weight.data_ptr() == ours.tok_embeddings.weight.data_ptr()
    g = small("gpt2")
    mine = from_transformers(g)
    assert g.transformer.h[0].attn.c_attn.weight.data_ptr() == mine.h[0].c_attn.weight.data_ptr()


def test_unsupported_architecture_is_named():
    cfg = transformers.GPTNeoXConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32)
    with pytest.raises(DynapruneError, match=r"GPTNeoXForCausalLM \(model_type 'gpt_neox'\).*bert, gpt2, llama"):
        from_transformers(transformers.GPTNeoXForCausalLM(cfg))


def test_half_precision_on_cpu_is_refused():
    with pytest.raises(DynapruneError, match=r"torch.float16 on CPU.*\.float\(\)"):
        from_transformers(small("llama").half())


def test_real_minilm(minilm_path):
    folder = minilm_path / "model" if (minilm_path / "model" / "config.json").exists() else minilm_path
    hf = transformers.AutoModel.from_pretrained(str(folder)).float().eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    enc = tok(["a cat sat on the mat", "pruning attention at run time"], padding=True, return_tensors="pt")
    ours = from_transformers(hf, tok)
    with torch.no_grad():
        states, mask = ours(enc["input_ids"], enc["attention_mask"])
        ref = hf(**enc).last_hidden_state
    keep = mask.bool()
    assert (states[keep] - ref[keep]).abs().max().item() <= TOL
    assert hf.embeddings.word_embeddings.weight.data_ptr() == ours.tok_emb.weight.data_ptr()


def test_real_smollm2(smollm2_path):
    from dynaprune.models import load

    hf = load(str(smollm2_path)).to_transformers()  # the checkpoint as a live transformers model
    ours = from_transformers(hf)
    ids = torch.randint(0, hf.config.vocab_size, (1, 24))
    assert max_diff(ours, hf, "llama", ids) <= TOL
    assert hf.model.layers[0].self_attn.q_proj.weight.data_ptr() == ours.layers[0].attention.wqkv.weight.data_ptr()

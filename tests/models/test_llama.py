"""Llama-family decoder: dense equivalence with transformers (SmolLM2 GGUF, random Llama/Mistral/Qwen2)."""

from __future__ import annotations

import pickle
import warnings

import pytest
import torch
import transformers

from dynaprune.errors import DynapruneError
from dynaprune.models.llama import Llama, LlamaConfig

TOL = 1e-4
SENTENCES = [
    "The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest structure "
    "in Paris.",
    "Grace Hopper wrote the first compiler.",
]


def hf_from_gguf(path):
    """transformers' own GGUF loading (dequantize + reverse Q/K permutation), as the oracle.

    ``from_pretrained(gguf_file=...)`` needs ``accelerate``; without it we run the same transformers
    code path by hand (``load_gguf_checkpoint`` into a ``LlamaForCausalLM``)."""
    folder, name = str(path.parent), path.name
    warnings.filterwarnings("ignore")
    try:
        return transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    except (ImportError, ValueError) as e:
        if "accelerate" not in str(e):
            raise
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = transformers.AutoConfig.from_pretrained(folder, gguf_file=name)
    hf = transformers.LlamaForCausalLM(config).float().eval()
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=hf)["tensors"]
    missing, unexpected = hf.load_state_dict(tensors, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    hf.tie_weights()
    return hf


@pytest.fixture(scope="module")
def smol(smollm2_path):
    return Llama.from_gguf(smollm2_path)


@pytest.fixture(scope="module")
def smol_hf(smollm2_path):
    return hf_from_gguf(smollm2_path)


def pad_batch(seqs, left):
    n = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), n, dtype=torch.long)
    mask = torch.zeros(len(seqs), n, dtype=torch.bool)
    for i, s in enumerate(seqs):
        sl = slice(n - len(s), n) if left else slice(0, len(s))
        ids[i, sl], mask[i, sl] = torch.tensor(s), True
    pos = (mask.long().cumsum(1) - 1).clamp(min=0)
    return ids, mask, pos


@pytest.mark.models
def test_smollm2_gguf_config_and_size(smol):
    c = smol.config
    assert (c.layers, c.heads, c.kv_heads, c.hidden, c.head_dim) == (30, 9, 3, 576, 64)
    assert c.tie_embeddings and c.rope_theta == 100000.0 and c.max_positions == 8192
    assert smol.n_params() == 134_515_008
    assert all(p.dtype == torch.float32 and p.is_contiguous() for p in smol.parameters())


@pytest.mark.models
def test_smollm2_matches_transformers_on_a_sentence(smol, smol_hf):
    ids = torch.tensor([smol.tokenizer(SENTENCES[0]).input_ids])
    with torch.inference_mode():
        ours, theirs = smol(ids), smol_hf(ids).logits
    assert ours.dtype == torch.float32 and ours.shape == theirs.shape
    assert (ours - theirs).abs().max() <= TOL


@pytest.mark.models
@pytest.mark.parametrize("left", [False, True], ids=["right-pad", "left-pad"])
def test_smollm2_matches_transformers_on_a_padded_batch(smol, smol_hf, left):
    ids, mask, pos = pad_batch([smol.tokenizer(s).input_ids for s in SENTENCES], left)
    with torch.inference_mode():
        ours = smol(ids, attention_mask=mask)  # default positions count real tokens only
        theirs = smol_hf(ids, attention_mask=mask.long(), position_ids=pos).logits
        alone = smol(torch.tensor([smol.tokenizer(SENTENCES[1]).input_ids]))
    assert (ours - theirs)[mask].abs().max() <= TOL
    assert torch.isfinite(ours).all()
    assert (ours[1][mask[1]] - alone[0]).abs().max() <= TOL  # padding changes nothing for the short row


@pytest.mark.models
def test_smollm2_kv_cache_decode_equals_full_forward(smol):
    ids = torch.tensor([smol.tokenizer(SENTENCES[0]).input_ids])
    n = ids.shape[1]
    with torch.inference_mode():
        full = smol(ids)
        cache = smol.new_cache(1, n)
        steps = [smol(ids[:, : n - 4], cache=cache)]
        steps += [smol(ids[:, i : i + 1], cache=cache) for i in range(n - 4, n)]
    assert (torch.cat(steps, dim=1) - full).abs().max() <= TOL
    assert cache.next_position.tolist() == [n] and cache.lengths == [n] * 30


# ---- random-weight checkpoints written by transformers -----------------------------------------

SMALL = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)
VARIANTS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(rope_theta=500000.0)),
    "llama-bias-llama3-rope": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        attention_bias=True, mlp_bias=True, tie_word_embeddings=True, head_dim=32,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32})),
    "llama-linear-rope": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(sliding_window=None)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
}


def save_random(kind, tmp_path):
    cfg_cls, model_cls, extra = VARIANTS[kind]
    torch.manual_seed(0)
    hf = model_cls(cfg_cls(**SMALL, **extra)).float().eval()
    with torch.no_grad():  # random biases and norms, so a mis-mapped tensor cannot hide
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(0, 0.5 if "norm" not in name else 0.2).add_(1.0 if "norm" in name else 0.0)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    return hf


@pytest.mark.parametrize("kind", list(VARIANTS))
def test_random_checkpoint_matches_transformers(kind, tmp_path):
    hf = save_random(kind, tmp_path)
    ours = Llama.from_hf_folder(tmp_path)
    assert ours.n_params() == sum(p.numel() for p in hf.parameters())
    torch.manual_seed(1)
    ids = torch.randint(0, SMALL["vocab_size"], (3, 40))
    _, mask, pos = pad_batch([list(range(40)), list(range(25)), list(range(7))], left=True)
    with torch.inference_mode():
        assert (ours(ids) - hf(ids).logits).abs().max() <= TOL
        a, b = ours(ids, attention_mask=mask), hf(ids, attention_mask=mask.long(), position_ids=pos).logits
        assert (a - b)[mask].abs().max() <= TOL
        # and back: our weights in a transformers model give the same logits
        assert (ours.to_transformers()(ids).logits - hf(ids).logits).abs().max() <= TOL


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_random_kv_cache_with_left_padding_equals_full_forward(kind, tmp_path):
    save_random(kind, tmp_path)
    model = Llama.from_hf_folder(tmp_path)
    torch.manual_seed(2)
    seqs = [torch.randint(0, 160, (n,)).tolist() for n in (30, 18)]
    ids, mask, _ = pad_batch(seqs, left=True)
    with torch.inference_mode():
        cache = model.new_cache(2, 40)
        model(ids[:, :-5], cache=cache, attention_mask=mask[:, :-5])
        decoded = torch.cat([model(ids[:, i : i + 1], cache=cache) for i in range(25, 30)], dim=1)
        for r, s in enumerate(seqs):
            alone = model(torch.tensor([s]))[0, -5:]
            assert (decoded[r] - alone).abs().max() <= TOL
    assert cache.next_position.tolist() == [30, 18]


def test_config_rejects_unsupported_rope_and_arch():
    base = dict(SMALL, model_type="llama")
    with pytest.raises(DynapruneError, match="rope scaling 'yarn'"):
        LlamaConfig.from_hf(dict(base, rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    with pytest.raises(DynapruneError, match="not a Llama-family"):
        LlamaConfig.from_hf(dict(base, model_type="gemma"))
    with pytest.raises(DynapruneError, match="hidden_act"):
        LlamaConfig.from_hf(dict(base, hidden_act="gelu"))
    # transformers 5 stores theta in rope_parameters, transformers 4 at top level
    assert LlamaConfig.from_hf(dict(base, rope_parameters={"rope_theta": 7.0, "rope_type": "default"})).rope_theta == 7
    assert LlamaConfig.from_hf(dict(base, rope_theta=9.0)).rope_theta == 9


def test_sliding_window_is_refused_beyond_the_window(tmp_path):
    cfg_cls, model_cls, _ = VARIANTS["mistral"]
    model_cls(cfg_cls(**SMALL, sliding_window=16)).save_pretrained(tmp_path, safe_serialization=True)
    model = Llama.from_hf_folder(tmp_path)
    assert model.config.sliding_window == 16
    model(torch.zeros(1, 16, dtype=torch.long))  # within the window: fine
    with pytest.raises(DynapruneError, match="sliding window"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_positions_beyond_the_model_are_refused(tmp_path):
    save_random("llama", tmp_path)
    model = Llama.from_hf_folder(tmp_path)
    with pytest.raises(DynapruneError, match="exceeds the model's maximum of 128"):
        model(torch.zeros(1, 129, dtype=torch.long))


# ---- bad input ------------------------------------------------------------------------------------


def test_folder_without_weights(tmp_path):
    transformers.LlamaConfig(**SMALL).save_pretrained(tmp_path)
    with pytest.raises(DynapruneError, match="no weights"):
        Llama.from_hf_folder(tmp_path)


def test_missing_folder_and_missing_config(tmp_path):
    with pytest.raises(DynapruneError, match="not a checkpoint folder"):
        Llama.from_hf_folder(tmp_path / "nope")
    with pytest.raises(DynapruneError, match="config.json"):
        Llama.from_hf_folder(tmp_path)


class _Boom:
    """Unpickling this writes a marker file: proof that a pickle was (wrongly) executed."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_only_folder_is_refused_and_never_unpickled(tmp_path):
    transformers.LlamaConfig(**SMALL).save_pretrained(tmp_path)
    marker = tmp_path / "EXECUTED"
    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps(_Boom(marker)))
    with pytest.raises(DynapruneError, match="pickle"):
        Llama.from_hf_folder(tmp_path)
    assert not marker.exists()


def test_weights_of_another_architecture_are_refused(tmp_path):
    save_random("llama", tmp_path)
    cfg = (tmp_path / "config.json").read_text().replace('"num_hidden_layers": 2', '"num_hidden_layers": 3')
    (tmp_path / "config.json").write_text(cfg)
    with pytest.raises(DynapruneError, match="missing tensor 'layers.2"):
        Llama.from_hf_folder(tmp_path)

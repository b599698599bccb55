"""GGUF loading: llama.cpp names, Q/K un-permutation, quantized tensors, metadata, corrupt files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, RopeScalingType
from gguf.quants import quantize

from dynaprune.errors import DynapruneError
from dynaprune.models.gguf_loader import gguf_config, read_gguf, unpermute_rope_rows
from dynaprune.models.llama import Llama

SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=20000.0)


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py ``LlamaModel.permute`` (what the loader must undo)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("n_head,rows,cols", [(4, 64, 16), (9, 576, 3), (3, 192, 0), (1, 8, 5)])
def test_unpermute_inverts_llamacpp_permute(n_head, rows, cols):
    w = np.random.default_rng(0).standard_normal((rows, cols) if cols else (rows,)).astype(np.float32)
    assert np.array_equal(unpermute_rope_rows(llamacpp_permute(w, n_head), n_head), w)


def write_gguf(hf, path, arch="llama", quant=False, linear_rope=None):
    """Write ``hf`` as llama.cpp would: its names, permuted Q/K (llama arch), optionally Q8_0 matrices."""
    c = hf.config
    w = GGUFWriter(str(path), arch=arch)
    w.add_name("tiny test model")
    w.add_block_count(c.num_hidden_layers)
    w.add_vocab_size(c.vocab_size)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(SMALL["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    if linear_rope is not None:
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(linear_rope)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
                 "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for key, t in hf.state_dict().items():
        if key == "lm_head.weight" and c.tie_word_embeddings:
            continue
        if key.startswith("model.layers."):
            _, _, i, rest = key.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            name = f"blk.{i}.{per_layer[module]}.{kind}"
        else:
            name = names[key]
        a = t.detach().float().numpy().copy()
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            a = llamacpp_permute(a, c.num_attention_heads if ".attn_q." in name else c.num_key_value_heads)
        if quant and a.ndim == 2:
            w.add_tensor(name, quantize(a, GGMLQuantizationType.Q8_0),
                         raw_dtype=GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def random_hf(kind):
    torch.manual_seed(0)
    if kind == "llama-linear-rope":
        cfg = transformers.LlamaConfig(**SMALL, rope_scaling={"rope_type": "linear", "factor": 4.0})
        hf = transformers.LlamaForCausalLM(cfg)
    elif kind == "qwen2":
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SMALL, tie_word_embeddings=True))
    else:
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL, tie_word_embeddings=False))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(0, 0.3).add_(1.0 if "norm" in name else 0.0)
    return hf.float().eval()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "llama-linear-rope"])
def test_f32_gguf_round_trip_matches_the_original_model(tmp_path, kind):
    hf = random_hf(kind)
    arch = "qwen2" if kind == "qwen2" else "llama"
    path = write_gguf(hf, tmp_path / "tiny.gguf", arch=arch, linear_rope=4.0 if "linear" in kind else None)
    model = Llama.from_gguf(path)
    assert model.config.arch == arch and model.config.qkv_bias == (kind == "qwen2")
    assert model.config.tie_embeddings == (kind == "qwen2") and model.config.rope_theta == 20000.0
    assert model.config.rope_scaling == ({"rope_type": "linear", "factor": 4.0} if "linear" in kind else None)
    ids = torch.randint(0, 96, (2, 30))
    with torch.inference_mode():
        assert (model(ids) - hf(ids).logits).abs().max() <= 1e-5


def test_quantized_gguf_matches_transformers_gguf_loading(tmp_path):
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = write_gguf(random_hf("llama"), tmp_path / "tiny-q8.gguf", quant=True)
    assert {t.tensor_type.name for t in GGUFReader(path).tensors} == {"Q8_0", "F32"}
    ours = Llama.from_gguf(path)
    parsed = load_gguf_checkpoint(str(path))["config"]
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**parsed)).float().eval()
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=hf)["tensors"]
    hf.load_state_dict(tensors, strict=True)
    ids = torch.randint(0, 96, (1, 25))
    with torch.inference_mode():
        assert (ours(ids) - hf(ids).logits).abs().max() <= 1e-4


@pytest.mark.models
def test_smollm2_metadata(smollm2_path):
    cfg = gguf_config(GGUFReader(smollm2_path), smollm2_path)
    assert cfg["num_hidden_layers"] == 30 and cfg["num_attention_heads"] == 9 and cfg["num_key_value_heads"] == 3
    assert cfg["hidden_size"] == 576 and cfg["intermediate_size"] == 1536 and cfg["head_dim"] == 64
    assert cfg["rope_theta"] == 100000.0 and cfg["max_position_embeddings"] == 8192
    assert abs(cfg["rms_norm_eps"] - 1e-5) < 1e-9 and cfg["vocab_size"] == 49152


@pytest.mark.models
@pytest.mark.parametrize("keep", [16, 4096, 2_000_000, -1000], ids=["header", "metadata", "tensor-info", "data"])
def test_truncated_gguf_is_a_clear_error(smollm2_path, tmp_path, keep):
    data = smollm2_path.read_bytes()
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(data[:keep])
    with pytest.raises(DynapruneError, match="truncated.gguf"):
        read_gguf(bad)


def test_not_a_gguf_and_missing_file(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"this is not a gguf file at all" * 100)
    with pytest.raises(DynapruneError, match="junk.gguf.*corrupt or truncated"):
        Llama.from_gguf(junk)
    with pytest.raises(DynapruneError, match="no such GGUF file"):
        Llama.from_gguf(tmp_path / "missing.gguf")


def test_unsupported_architecture(tmp_path):
    w = GGUFWriter(str(tmp_path / "falcon.gguf"), arch="falcon")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(DynapruneError, match="architecture 'falcon' is not supported"):
        Llama.from_gguf(tmp_path / "falcon.gguf")

"""Reading HF checkpoint folders (config.json + safetensors) safely: never unpickle."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from dynaprune.errors import DynapruneError

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl"}


def refuse_pickle(path: Path) -> None:
    raise DynapruneError(
        f"{path}: pickle checkpoints are not loaded (unpickling can run arbitrary code). Convert it "
        "once to safetensors, e.g. `python -c \"import torch; from safetensors.torch import save_file; "
        "save_file(torch.load('pytorch_model.bin', weights_only=True), 'model.safetensors')\"`."
    )


def read_config(folder: Path) -> dict:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise DynapruneError(f"{folder}: no config.json (expected a Hugging Face checkpoint folder)")
    try:
        return json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DynapruneError(f"{cfg_path}: not valid JSON ({e})") from None


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of the folder's *.safetensors shards, as fp32. Refuses pickle-only folders."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = [p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            refuse_pickle(pickles[0])
        raise DynapruneError(f"{folder}: no weights (*.safetensors) found")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            shard = load_file(str(f))
        except (SafetensorError, OSError, ValueError) as e:
            raise DynapruneError(f"{f}: corrupt or truncated safetensors file ({e})") from None
        state.update({k: v.float() if v.is_floating_point() else v for k, v in shard.items()})
    return state


def strip_prefix(state: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Drop a leading model prefix (``bert.``, ``model.``, ``transformer.``) where checkpoints carry one."""
    out = {}
    for k, v in state.items():
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p):]
                break
        out[k] = v
    return out


def assign_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` (our parameter names) into ``model`` as its own fp32 tensors, every shape checked
    first so a checkpoint that does not match its config is one clear error."""
    want = model.state_dict()
    for k, v in state.items():
        if v.shape != want[k].shape:
            expected = tuple(want[k].shape)
            raise DynapruneError(f"{source}: tensor for {k} has shape {tuple(v.shape)}, expected {expected}")
    model.load_state_dict({k: v.float().contiguous() for k, v in state.items()}, strict=True, assign=True)


def folder_tokenizer(folder: Path, files: tuple[str, ...]):
    """The folder's tokenizer (transformers' AutoTokenizer) if any of ``files`` is there, else None."""
    if not any((folder / f).exists() for f in files):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def read_hf_folder(
    path: str | Path, tokenizer_files: tuple[str, ...]
) -> tuple[dict, dict[str, torch.Tensor], object, Path]:
    """(config.json, safetensors state, tokenizer or None, folder) of an HF checkpoint folder."""
    folder = Path(path)
    if not folder.is_dir():
        raise DynapruneError(f"{folder}: not a checkpoint folder")
    return read_config(folder), read_safetensors(folder), folder_tokenizer(folder, tokenizer_files), folder

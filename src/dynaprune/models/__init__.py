"""Model loading: aliases, HF checkpoint folders, GGUF files, hub ids (when online)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from dynaprune.errors import DynapruneError
from dynaprune.models.checkpoint import PICKLE_SUFFIXES, read_config, refuse_pickle
from dynaprune.models.registry import KNOWN_MODELS, fetch

DECODER_TYPES = {"llama", "mistral", "qwen2"}


def _from_folder(folder: Path):
    model_type = read_config(folder).get("model_type")
    if model_type == "bert":
        from dynaprune.models.bert import Bert

        return Bert.from_hf_folder(folder)
    if model_type in DECODER_TYPES:
        from dynaprune.models.llama import Llama

        return Llama.from_hf_folder(folder)
    if model_type == "gpt2":
        from dynaprune.models.gpt2 import GPT2

        return GPT2.from_hf_folder(folder)
    raise DynapruneError(
        f"{folder}: model_type {model_type!r} is not supported "
        f"(supported: bert, gpt2, {', '.join(sorted(DECODER_TYPES))})"
    )


def _from_path(path: Path):
    if path.is_dir():
        return _from_folder(path)
    if path.suffix == ".gguf":
        from dynaprune.models.gemma3_gguf import gguf_architecture

        if path.is_file() and gguf_architecture(path) == "gemma3":
            from dynaprune.models.gemma3 import Gemma3

            return Gemma3.from_gguf(path)
        from dynaprune.models.llama import Llama

        return Llama.from_gguf(path)
    if path.suffix == ".safetensors" or path.name == "config.json":
        return _from_folder(path.parent)
    if path.suffix in PICKLE_SUFFIXES:
        refuse_pickle(path)
    raise DynapruneError(f"{path}: not a model folder, .gguf or .safetensors file")


def _from_hub(repo_id: str):
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise DynapruneError(
            f"{repo_id!r} is not a known alias or an existing path, and huggingface_hub is not "
            "installed to fetch it from the hub (pip install 'dynaprune[hub]')"
        ) from None
    try:
        folder = snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"])
    except Exception as e:  # noqa: BLE001 - any hub failure is one message for the user
        raise DynapruneError(f"{repo_id!r} is no local path, and fetching it from the hub failed: {e}") from None
    return _from_folder(Path(folder))


def load(name_or_path: str | Path, progress: Callable[[str], None] | None = None):
    """Load a model: a known alias (fetched on first use), a local checkpoint folder, a ``.gguf`` file,
    or a hub id ``org/name`` when online. Returns our own model (Bert, Llama, Gemma3 or GPT2) in eval mode."""
    name = str(name_or_path)
    if name in KNOWN_MODELS:
        path = fetch(name, progress)
        model = _from_path(path)
    elif Path(name).exists():
        model = _from_path(Path(name))
    elif name.count("/") == 1 and not name.startswith((".", "/")) and "\\" not in name:
        model = _from_hub(name)
    else:
        raise DynapruneError(
            f"unknown model {name!r}: not an alias ({', '.join(KNOWN_MODELS)}) and no such path"
        )
    model.name = name
    return model.eval()

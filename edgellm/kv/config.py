"""KVConfig: the user's choice of KV-cache policy, budget and storage type."""
from __future__ import annotations

from dataclasses import dataclass

POLICIES = ("full", "window", "h2o", "snapkv", "infinipot")
IMPLEMENTED_POLICIES = ("full",)
KV_DTYPES = ("f16", "q8_0", "q4_0")
SPILL_TIERS = (None, "ram", "ssd")


@dataclass(frozen=True)
class KVConfig:
    policy: str = "full"
    budget: int | None = None      # tokens kept hot; None = the model's trained context length
    kv_dtype: str = "f16"
    spill: str | None = None
    spill_dir: str | None = None
    block_size: int = 64           # tokens per KV block (the unit of quantization, spill and recall)

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"KVConfig.policy={self.policy!r}: choose one of {', '.join(POLICIES)}")
        if self.policy not in IMPLEMENTED_POLICIES:
            raise ValueError(f"KVConfig.policy={self.policy!r} is not available in this version of edgellm "
                             f"(available: {', '.join(IMPLEMENTED_POLICIES)})")
        if self.kv_dtype not in KV_DTYPES:
            raise ValueError(f"KVConfig.kv_dtype={self.kv_dtype!r}: choose one of {', '.join(KV_DTYPES)}")
        if self.spill not in SPILL_TIERS:
            raise ValueError(f"KVConfig.spill={self.spill!r}: choose one of None, 'ram', 'ssd'")
        if self.spill is not None:
            raise ValueError("KVConfig.spill is not available in this version of edgellm (only spill=None)")
        if self.budget is not None and (not isinstance(self.budget, int) or self.budget <= 0):
            raise ValueError(f"KVConfig.budget={self.budget!r}: give a positive number of tokens")
        if self.block_size <= 0 or self.block_size % 32:
            raise ValueError(f"KVConfig.block_size={self.block_size}: must be a positive multiple of 32")

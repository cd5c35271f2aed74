"""KVConfig: the user's choice of KV-cache policy, budget and storage type."""
from __future__ import annotations

import re
from dataclasses import dataclass

POLICIES = ("full", "window", "h2o", "snapkv", "infinipot")
KV_DTYPES = ("f16", "q8_0", "q4_0")
SPILL_TIERS = (None, "ram", "ssd")
DEFAULT_BUDGET = 2048
INFINIPOT_COMPRESS_RATIO = 0.75  # see KVConfig.compress_ratio
DEFAULT_CATALYST = "Summarize the previous context highlighting the most important parts."
_UNITS = {"": 1, "B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


@dataclass(frozen=True)
class KVConfig:
    """policy: 'full' grows up to the model's trained window; the others keep at most `budget` tokens hot.
    budget: tokens (int) or bytes ('64MB', converted with the KV dtype); None = the model's window for
    'full', 2048 tokens otherwise. compress_ratio: the share of the budget kept at each compaction
    (InfiniPot's |C|/|M|; every policy compacts in batches to this size when the next chunk would overflow);
    None = 0.75 for 'infinipot', 0.5 otherwise. With 0.75 the pot at question time holds 768 distilled
    entries and at most 256 raw recent ones (0.5: 512 + 512 raw filler between the needle and the question);
    SmolLM2-135M passkey through 1,024 tokens (README): 16K 67% (0.5, one key per depth) -> 96% (0.75, 26 of 27
    keys), 32K 78% -> 100% (18 of 18)."""
    policy: str = "full"
    budget: int | str | None = None
    kv_dtype: str = "f16"
    spill: str | None = None
    spill_dir: str | None = None
    block_size: int = 64              # tokens per KV block (the unit of quantization, spill and recall)
    compress_ratio: float | None = None
    sink: int = 4                     # first tokens always kept (window, infinipot)
    alpha: float = 0.5                # infinipot: share of kept slots chosen by novelty (NuC)
    catalyst: str = DEFAULT_CATALYST  # infinipot: the catalyst prompt (CaP)
    query_aware: bool = False         # infinipot: put the end of the prompt (the question) into the catalyst
    query_tokens: int = 64            # how many final prompt tokens count as the question
    cap_reduce: str = "max"           # infinipot: CaP score = max or sum over catalyst tokens
    pool: int = 5                     # infinipot: scores max-pooled over this many neighbours (keeps spans whole)
    h2o_recent_ratio: float = 0.5
    snapkv_window: int = 32
    snapkv_kernel: int = 5

    def __post_init__(self):
        if self.compress_ratio is None:
            object.__setattr__(self, "compress_ratio", INFINIPOT_COMPRESS_RATIO if self.policy == "infinipot" else 0.5)
        checks = [
            (self.policy in POLICIES, f"policy={self.policy!r}: choose one of {', '.join(POLICIES)}"),
            (self.kv_dtype in KV_DTYPES, f"kv_dtype={self.kv_dtype!r}: choose one of {', '.join(KV_DTYPES)}"),
            (self.spill in SPILL_TIERS, f"spill={self.spill!r}: choose one of None, 'ram', 'ssd'"),
            (self.spill is None, "spill is not available in this version of edgellm (only spill=None)"),
            (self.block_size > 0 and self.block_size % 32 == 0, f"block_size={self.block_size}: a positive multiple of 32"),
            (0 < self.compress_ratio < 1, "compress_ratio must be in (0, 1)"),
            (0 <= self.alpha <= 1, "alpha must be in [0, 1]"),
            (self.sink >= 0 and self.query_tokens > 0, "sink must be >= 0 and query_tokens > 0"),
            (self.cap_reduce in ("max", "sum"), "cap_reduce must be 'max' or 'sum'"),
            (self.pool >= 1, "pool must be >= 1"),
            (0 <= self.h2o_recent_ratio <= 1, "h2o_recent_ratio must be in [0, 1]"),
            (self.snapkv_window > 0 and self.snapkv_kernel > 0, "snapkv_window and snapkv_kernel must be > 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"KVConfig.{msg}")
        self.budget_bytes()  # validates the budget's form

    def budget_bytes(self) -> int | None:
        """The budget in bytes when it was given as a size string, else None."""
        b = self.budget
        if b is None or (isinstance(b, int) and not isinstance(b, bool) and b > 0):
            return None
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?I?B?)\s*", str(b).upper()) if isinstance(b, str) else None
        if not m:
            raise ValueError(f"KVConfig.budget={b!r}: give a positive number of tokens or a size such as '64MB'")
        return int(float(m.group(1)) * _UNITS[m.group(2)])

    def budget_tokens(self, bytes_per_token: float, model_window: int) -> int:
        """The budget in tokens for a cache of `bytes_per_token`."""
        size = self.budget_bytes()
        if size is not None:
            tokens = int(size // bytes_per_token)
        else:
            tokens = self.budget or (model_window if self.policy == "full" else DEFAULT_BUDGET)
        if tokens < 64:
            raise ValueError(f"KVConfig.budget={self.budget!r} holds {tokens} tokens; give room for at least 64")
        return tokens

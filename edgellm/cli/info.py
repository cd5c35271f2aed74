"""`edgellm info`: what a model is and how much memory it needs at full context."""
from __future__ import annotations

from edgellm.cli.common import KV_DTYPES

# storage bytes per KV element: f16 = 2; q8_0 / q4_0 blocks are 32 values + one f16 scale
KV_BYTES_PER_ELEMENT = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}


def memory_estimate(info: dict) -> dict:
    """Weights + KV at the model's full context for each KV dtype, in bytes.

    `info` must come from a model opened with the f16 KV cache, so that
    kv_bytes_per_token / 2 is the number of K and V elements cached per token."""
    elements = info["kv_bytes_per_token"] / KV_BYTES_PER_ELEMENT["f16"]
    n_ctx = info["context_length"]
    estimate = {}
    for dtype in KV_DTYPES:
        per_token = round(elements * KV_BYTES_PER_ELEMENT[dtype])
        estimate[dtype] = {"kv_bytes_per_token": per_token, "kv_bytes": per_token * n_ctx,
                           "total_bytes": info["weights_bytes"] + per_token * n_ctx}
    return estimate


def fmt_bytes(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"


def fmt_count(n: int) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.1f}{suffix}"
    return str(n)


def format_info(info: dict, estimate: dict) -> str:
    quant = ", ".join(f"{name} x{count}" for name, count in
                      sorted(info["quant_types"].items(), key=lambda kv: -kv[1]))
    rows = [
        ("name", info["name"]),
        ("path", f"{info['path']} ({fmt_bytes(info['file_size'])})"),
        ("arch", info["arch"]),
        ("parameters", fmt_count(info["n_params"])),
        ("quant types", quant),
        ("context length", str(info["context_length"])),
        ("layers", str(info["n_layer"])),
        ("embedding", str(info["n_embd"])),
        ("heads (kv)", f"{info['n_head']} ({info['n_head_kv']})"),
        ("vocab", str(info["vocab_size"])),
        ("weights", fmt_bytes(info["weights_bytes"])),
    ]
    width = max(len(key) for key, _ in rows)
    lines = [f"{key:<{width}}  {value}" for key, value in rows]
    lines += ["", f"memory at full context ({info['context_length']} tokens):",
              f"  {'kv dtype':<8}  {'KV/token':>10}  {'KV total':>10}  {'weights+KV':>10}"]
    for dtype, est in estimate.items():
        lines.append(f"  {dtype:<8}  {fmt_bytes(est['kv_bytes_per_token']):>10}  "
                     f"{fmt_bytes(est['kv_bytes']):>10}  {fmt_bytes(est['total_bytes']):>10}")
    return "\n".join(lines)

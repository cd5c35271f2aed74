"""GGUF block quantization formats (numpy reference)."""
from .blocks import (ACT_BLOCK_DTYPE, BLOCK_DTYPES, BLOCK_SIZES, GROUPED_KEYS, INTERLEAVED, QK, REPACKED, GGMLType,
                     dequantize, dequantize_activations, group_keys, quantize, quantize_activations, interleave_rows,
                     repack_rows, row_bytes, ungroup_keys, unpack_rows)

__all__ = ["ACT_BLOCK_DTYPE", "BLOCK_DTYPES", "BLOCK_SIZES", "GROUPED_KEYS", "INTERLEAVED", "QK", "REPACKED",
           "GGMLType", "dequantize", "dequantize_activations", "group_keys", "quantize", "quantize_activations",
           "interleave_rows", "repack_rows", "row_bytes", "ungroup_keys", "unpack_rows"]

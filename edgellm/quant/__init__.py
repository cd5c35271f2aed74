"""GGUF block quantization formats (numpy reference)."""
from .blocks import (ACT_BLOCK_DTYPE, BLOCK_DTYPES, BLOCK_SIZES, QK, GGMLType, dequantize,
                     dequantize_activations, quantize, quantize_activations, row_bytes)

__all__ = ["ACT_BLOCK_DTYPE", "BLOCK_DTYPES", "BLOCK_SIZES", "QK", "GGMLType", "dequantize",
           "dequantize_activations", "quantize", "quantize_activations", "row_bytes"]

"""GGUF reader: metadata as python values, tensors as read-only views of one memory map.

Nothing is copied at load: a tensor's `data` is a numpy view into the mapped file, so pages are
read from disk only when a kernel touches them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..quant.blocks import BLOCK_SIZES, GGMLType
from .errors import ModelFormatError

GGUF_MAGIC = b"GGUF"
SUPPORTED_TYPES = frozenset({GGMLType.F32, GGMLType.F16, GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q8_0})


@dataclass
class Tensor:
    name: str
    type: GGMLType
    shape: tuple[int, ...]  # numpy order: (rows, cols) for a matrix, cols = the contiguous dimension
    data: np.ndarray        # uint8 rows of blocks for quantized types, float32/float16 otherwise

    @property
    def rows(self) -> int:
        return int(np.prod(self.shape[:-1])) if len(self.shape) > 1 else 1

    @property
    def cols(self) -> int:
        return self.shape[-1]


class GGUFFile:
    """An opened GGUF file: `metadata` (key -> python value) and `tensors` (name -> Tensor)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._check_header()
        from gguf import GGUFReader  # imported lazily: it is slow to import and only needed here
        try:
            reader = GGUFReader(self.path, "r")
        except (ValueError, IndexError, OverflowError, MemoryError) as e:
            raise ModelFormatError(self.path, f"corrupt or truncated GGUF header ({e})") from None
        self.metadata = {name: _field_value(field) for name, field in reader.fields.items()
                         if not name.startswith("GGUF.")}
        self.tensors = {t.name: self._tensor(reader, t) for t in reader.tensors}
        self._mmap = reader.data

    def _check_header(self):
        if not self.path.is_file():
            raise ModelFormatError(self.path, "no such file")
        with open(self.path, "rb") as f:
            magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise ModelFormatError(self.path, f"not a GGUF file (magic {magic!r}, expected b'GGUF')")

    def _tensor(self, reader, t) -> Tensor:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists dims fastest-first
        try:
            ttype = GGMLType(int(t.tensor_type))
        except ValueError:
            ttype = None
        if ttype not in SUPPORTED_TYPES:
            raise ModelFormatError(self.path, f"tensor {t.name!r} has type {t.tensor_type.name}, which edgellm "
                                   f"does not support (supported: {', '.join(x.name for x in sorted(SUPPORTED_TYPES))})")
        per_block, block_bytes = BLOCK_SIZES[ttype]
        n_bytes = int(np.prod(shape)) // per_block * block_bytes
        end = int(t.data_offset) + n_bytes
        if end > reader.data.shape[0]:
            raise ModelFormatError(self.path, f"truncated: tensor {t.name!r} needs bytes up to {end:,} "
                                   f"but the file has {reader.data.shape[0]:,}")
        if shape[-1] % per_block:
            raise ModelFormatError(self.path, f"tensor {t.name!r}: row length {shape[-1]} is not a multiple of {per_block}")
        return Tensor(t.name, ttype, shape, t.data)

    def get(self, name: str) -> Tensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise ModelFormatError(self.path, f"missing tensor {name!r}") from None

    def require(self, key: str):
        try:
            return self.metadata[key]
        except KeyError:
            raise ModelFormatError(self.path, f"missing metadata key {key!r}") from None


def _field_value(field):
    try:
        return field.contents()
    except Exception as e:  # the gguf package raises several types for malformed fields
        raise ModelFormatError("<gguf>", f"unreadable metadata field {field.name!r}: {e}") from None

"""GGUF reader: metadata as python values, tensors as read-only views of one memory map.

Nothing is copied at load: a tensor's `data` is a numpy view into the mapped file, so pages are
read from disk only when a kernel touches them. The map is private copy-on-write: the native backend
repacks quantized matrices in place on first use (el_repack; `data` then holds that layout, see
NativeBackend), which never reaches the file; a page it rewrites becomes the process's own memory
instead of shared page cache, the same RSS. The numpy views stay read-only.

The header is parsed here with `struct` over the map rather than with gguf-py's GGUFReader, which
builds a numpy array for every part of every string: for a 49k-token vocabulary that is ~150 MB of
transient objects and ~4 s, more than the Q4 weights of a small model. The value and tensor type
codes come from the `gguf` package; tests/test_gguf.py checks that both readers agree.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType

from ..quant.blocks import BLOCK_SIZES, GGMLType
from .errors import ModelFormatError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
SUPPORTED_TYPES = frozenset({GGMLType.F32, GGMLType.F16, GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q8_0})
_SCALARS = {GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
            GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
            GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
            GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d"}
_ELEMENT_DTYPE = {GGMLType.F32: np.float32, GGMLType.F16: np.float16}


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


class _Cursor:
    """Sequential little-endian reads over the map; running off its end means a truncated file."""

    def __init__(self, buf, path):
        self.buf, self.off, self.path = buf, 0, path

    def take(self, n: int) -> int:
        start = self.off
        if n < 0 or start + n > len(self.buf):
            raise ModelFormatError(self.path, f"truncated or corrupt header (needs {start + n:,} bytes, "
                                   f"file has {len(self.buf):,})")
        self.off += n
        return start

    def scalar(self, fmt: str):
        return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.scalar("<Q")
        start = self.take(n)
        return bytes(self.buf[start:start + n]).decode("utf-8", errors="replace")

    def value(self, vtype: int):
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            item, count = self.scalar("<I"), self.scalar("<Q")
            if item == GGUFValueType.STRING:
                return [self.string() for _ in range(count)]
            fmt = _SCALARS.get(item)
            if fmt is None:
                raise ModelFormatError(self.path, f"unsupported metadata array type {item}")
            size = struct.calcsize(fmt)
            start = self.take(count * size)
            return np.frombuffer(self.buf, np.dtype(fmt), count, start).tolist()
        fmt = _SCALARS.get(vtype)
        if fmt is None:
            raise ModelFormatError(self.path, f"unsupported metadata value type {vtype}")
        return self.scalar(fmt)


class GGUFFile:
    """An opened GGUF file: `metadata` (key -> python value) and `tensors` (name -> Tensor)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFormatError(self.path, "no such file")
        with open(self.path, "rb") as f:
            if f.read(4) != GGUF_MAGIC:
                f.seek(0)
                raise ModelFormatError(self.path, f"not a GGUF file (magic {f.read(4)!r}, expected b'GGUF')")
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        cur = _Cursor(self._map, self.path)
        cur.take(4)
        version = cur.scalar("<I")
        if version not in SUPPORTED_VERSIONS:
            raise ModelFormatError(self.path, f"GGUF version {version} is not supported (supported: 2, 3)")
        n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
        self.metadata = {}
        for _ in range(n_kv):
            key = cur.string()
            self.metadata[key] = cur.value(cur.scalar("<I"))
        infos = [self._tensor_info(cur) for _ in range(n_tensors)]
        align = int(self.metadata.get("general.alignment", 32))
        data_start = -(-cur.off // align) * align
        self.tensors = {name: self._tensor(name, shape, ttype, data_start + offset)
                        for name, shape, ttype, offset in infos}
        self._release_header(data_start)

    def _release_header(self, end: int) -> None:
        """Drop the header's pages (up to the page that holds the first tensor) from this process's RSS: the metadata
        and tensor infos are python values now, and a vocabulary's strings alone are megabytes. They are clean file
        pages: anything that touched them again would read them back from the page cache."""
        page_end = end // mmap.PAGESIZE * mmap.PAGESIZE
        if page_end and hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED, 0, page_end)

    @staticmethod
    def _tensor_info(cur: _Cursor):
        name = cur.string()
        dims = [cur.scalar("<Q") for _ in range(cur.scalar("<I"))]
        return name, tuple(reversed(dims)), cur.scalar("<I"), cur.scalar("<Q")  # GGUF lists dims fastest-first

    def _tensor(self, name: str, shape: tuple[int, ...], type_id: int, start: int) -> Tensor:
        try:
            ttype = GGMLType(type_id)
        except ValueError:
            ttype = None
        if ttype not in SUPPORTED_TYPES:
            try:
                type_name = GGMLQuantizationType(type_id).name
            except ValueError:
                type_name = f"unknown type {type_id}"
            raise ModelFormatError(self.path, f"tensor {name!r} has type {type_name}, which edgellm does not support "
                                   f"(supported: {', '.join(x.name for x in sorted(SUPPORTED_TYPES))})")
        per_block, block_bytes = BLOCK_SIZES[ttype]
        if not shape or shape[-1] % per_block:
            raise ModelFormatError(self.path, f"tensor {name!r}: row length {shape[-1:]} is not a multiple of {per_block}")
        n_bytes = int(np.prod(shape)) // per_block * block_bytes
        if start + n_bytes > len(self._map):
            raise ModelFormatError(self.path, f"truncated: tensor {name!r} needs bytes up to {start + n_bytes:,} "
                                   f"but the file has {len(self._map):,}")
        if ttype in _ELEMENT_DTYPE:
            data = np.frombuffer(self._map, _ELEMENT_DTYPE[ttype], int(np.prod(shape)), start).reshape(shape)
        else:
            data = np.frombuffer(self._map, np.uint8, n_bytes, start).reshape(-1, shape[-1] // per_block * block_bytes)
        data.flags.writeable = False   # only the native kernels write (repack) through the map
        return Tensor(name, ttype, shape, data)

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

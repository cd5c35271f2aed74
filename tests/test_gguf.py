"""Our GGUF header parser against gguf-py's GGUFReader on the real model."""
import ctypes
import sys

import numpy as np
import pytest
from smaps import mapping_field

from edgellm.formats.gguf import GGUFFile


def test_matches_gguf_reader(model_path):
    from gguf import GGUFReader
    ref = GGUFReader(model_path)
    ours = GGUFFile(model_path)
    want = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert ours.metadata.keys() == want.keys()
    for k, v in want.items():
        if isinstance(v, float):
            assert abs(ours.metadata[k] - v) <= 1e-6 * abs(v), k
        else:
            assert ours.metadata[k] == v, k
    assert [t.name for t in ref.tensors] == list(ours.tensors)
    for t in ref.tensors:
        mine = ours.tensors[t.name]
        assert mine.type == int(t.tensor_type)
        assert mine.shape == tuple(reversed(t.shape.tolist()))
        np.testing.assert_array_equal(mine.data, np.asarray(t.data).reshape(mine.data.shape))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_header_pages_leave_rss_once_parsed(model_path):
    """The header (megabytes of vocabulary strings) is python values once parsed: its pages are released. What may
    stay is the page it shares with the first tensor and what the kernel maps around that page's fault (64 KiB, more
    where the page cache holds the file in large folios: 308 KiB seen for a file just downloaded)."""
    g = GGUFFile(model_path)
    view = ctypes.c_char.from_buffer(g._map)
    try:
        base = ctypes.addressof(view)
        header = min(t.data.ctypes.data for t in g.tensors.values()) - base
        assert header > 1 << 20
        assert int(mapping_field(base, "Rss")[0]) * 1024 < header // 4
    finally:
        del view
    assert len(g.metadata["tokenizer.ggml.tokens"]) == 49152
    assert np.isfinite(g.tensors["output_norm.weight"].data).all()

"""Our GGUF header parser against gguf-py's GGUFReader on the real model."""
import mmap

import numpy as np
import pytest

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


def test_release_drops_pages_but_keeps_the_kept(model_path):
    """release() hands a tensor's pages back (a rewritten byte of the private map reverts to the file's), except pages
    it shares with a `keep` tensor (token_embd ends inside blk.0.attn_norm's first page): those keep what was written."""
    gf = GGUFFile(model_path)
    mem = np.frombuffer(gf._map, np.uint8)   # writable: the map is private copy-on-write
    embd, norm, down = (gf.tensors[n].data for n in ("token_embd.weight", "blk.0.attn_norm.weight", "blk.0.ffn_down.weight"))
    at = lambda a, i: a.ctypes.data - mem.ctypes.data + i
    assert at(embd, embd.nbytes) // mmap.PAGESIZE == at(norm, 0) // mmap.PAGESIZE   # the shared page
    spots = {"embd_end": at(embd, embd.nbytes - 1), "norm": at(norm, 0), "down_mid": at(down, down.nbytes // 2)}
    file = {k: int(mem[o]) for k, o in spots.items()}
    for o in spots.values():
        mem[o] ^= 0xFF
    gf.release([norm, down], keep=[embd])
    after = {k: int(mem[o]) for k, o in spots.items()}
    assert after["down_mid"] == file["down_mid"]   # released: read back from the file
    assert after["embd_end"] == file["embd_end"] ^ 0xFF and after["norm"] == file["norm"] ^ 0xFF   # the kept page


def test_release_refuses_other_memory(model_path):
    with pytest.raises(ValueError, match="not a view"):
        GGUFFile(model_path).release([np.zeros(8, np.uint8)])

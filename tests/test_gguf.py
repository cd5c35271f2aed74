"""Our GGUF header parser against gguf-py's GGUFReader on the real model."""
import numpy as np

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

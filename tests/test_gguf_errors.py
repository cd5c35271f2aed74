"""Bad model files give one clear error naming the file and the problem."""
import numpy as np
import pytest

from edgellm.formats.errors import ModelFormatError
from edgellm.runtime.model import Model


def _write_gguf(path, arch="llama", tensor_type=None):
    import gguf
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    data = np.zeros((4, 32), np.float32)
    if tensor_type is None:
        w.add_tensor("token_embd.weight", data)
    else:  # raw bytes of a type we do not support (Q5_0: 22 bytes per 32 values)
        w.add_tensor("token_embd.weight", np.zeros((4, 22), np.uint8), raw_dtype=tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _error(path) -> str:
    with pytest.raises(ModelFormatError) as e:
        Model(path)
    assert str(path) in str(e.value)
    return e.value.problem


def test_not_gguf(tmp_path):
    p = tmp_path / "model.gguf"
    p.write_bytes(b"PK\x03\x04 this is a zip file")
    assert "not a GGUF file" in _error(p)


def test_missing_file(tmp_path):
    assert "no such file" in _error(tmp_path / "absent.gguf")


def test_truncated_real_model(model_path, tmp_path):
    p = tmp_path / "cut.gguf"
    with open(model_path, "rb") as src:
        p.write_bytes(src.read(model_path.stat().st_size // 2))
    assert "truncated" in _error(p)


def test_truncated_header(model_path, tmp_path):
    p = tmp_path / "header.gguf"
    with open(model_path, "rb") as src:
        p.write_bytes(src.read(4096))
    assert "truncated" in _error(p) or "corrupt" in _error(p)


def test_unknown_architecture(tmp_path):
    p = tmp_path / "arch.gguf"
    _write_gguf(p, arch="mamba")
    assert "unsupported architecture 'mamba'" in _error(p)


def test_unsupported_tensor_type(tmp_path):
    import gguf
    p = tmp_path / "q5.gguf"
    _write_gguf(p, tensor_type=gguf.GGMLQuantizationType.Q5_0)
    msg = _error(p)
    assert "token_embd.weight" in msg and "Q5_0" in msg and "does not support" in msg


def test_load_maps_weights_without_reading_them(model_path):
    """Weights are views of a memory map: loading reads metadata (the vocabulary), not the ~90 MB of tensors."""
    import subprocess
    import sys
    code = (
        "import psutil, gguf\n"
        "import edgellm.runtime.backend_native\n"
        "from edgellm.runtime.model import Model\n"
        "p = psutil.Process()\n"
        "before = p.memory_info().rss\n"
        f"m = Model({str(model_path)!r})\n"
        "loaded = p.memory_info().rss - before\n"
        "sum(float(t.data.reshape(-1)[::4096].astype('f4').sum()) for t in m.weights.tensors())\n"
        "print(loaded, m.gguf.path.stat().st_size)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    loaded, size = int(out[0]), int(out[1])
    assert loaded < 0.3 * size, f"load grew RSS by {loaded / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB file"

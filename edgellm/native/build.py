"""cffi (API mode) build of edgellm.native._kernels.

Compiled at baseline ISA: SIMD kernels carry their own target pragmas and are selected at run time,
so one build runs on any x86-64 / aarch64 machine. `python edgellm/native/build.py` builds in place.
"""
import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = ["core.c", "kernels_scalar.c", "kernels_avx2.c", "kernels_avx512.c", "kernels_neon.c", "attention.c", "sample.c", "scores.c", "step.c"]


def public_api() -> str:
    """The cdef: the public part of kernels.h, so the C header stays the one declaration of the API."""
    with open(os.path.join(HERE, "kernels.h")) as f:
        text = f.read()
    return text.split("/* ---- public API ---- */")[1].split("/* ---- internal ---- */")[0]


ffibuilder = FFI()
ffibuilder.cdef(public_api())
ffibuilder.set_source(
    "edgellm.native._kernels",
    '#include "kernels.h"',
    # setuptools insists on paths relative to setup.py (the working directory of a pip build)
    sources=[os.path.relpath(os.path.join(HERE, s)) for s in SOURCES],
    include_dirs=[os.path.relpath(HERE)],
    # fp-contract=off: the quantizers must round exactly like ggml's reference on every ISA. Functions and loops at
    # fixed alignments: code added before a kernel no longer moves its hot loops (decode attention ran ~3% slower
    # at 2 threads after unrelated matmul code grew in front of it)
    extra_compile_args=["-O3", "-std=c11", "-pthread", "-ffp-contract=off", "-fno-math-errno", "-Wall",
                        "-falign-functions=64", "-falign-loops=32", "-fno-wrapv"],
    extra_link_args=["-pthread"],
    libraries=["m"],
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=os.path.dirname(os.path.dirname(HERE)), verbose=False)

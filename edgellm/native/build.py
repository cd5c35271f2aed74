"""cffi (API mode) build of edgellm.native._kernels.

Compiled at baseline ISA: SIMD kernels carry their own target pragmas and are selected at run time,
so one build runs on any x86-64 / aarch64 machine. `python edgellm/native/build.py` builds in place.
"""
import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = ["core.c", "kernels_scalar.c", "kernels_avx2.c", "attention.c"]

CDEF = """
enum { EL_F32 = 0, EL_F16 = 1, EL_Q4_0 = 2, EL_Q4_1 = 3, EL_Q8_0 = 8 };
typedef struct {
    const void *k;
    const void *v;
    const int32_t *pos;
    int n;
    int cap;
    int dtype;
} el_kvblock;
int  el_simd_level(void);
int  el_set_simd(int level);
void el_set_threads(int n);
int  el_get_threads(void);
void el_matmul(const void *W, int wtype, int rows, int cols, const float *X, int n, float *Y, int ldy);
void el_matmul_f32act(const void *W, int wtype, int rows, int cols, const float *X, int n, float *Y, int ldy);
void el_get_rows(const void *W, int wtype, int cols, const int32_t *ids, int n, float *out);
void el_rmsnorm(const float *x, const float *w, int n, int dim, float eps, float *out);
void el_rope(float *x, int n, int n_heads, int head_dim, int rope_dim, const int32_t *pos, float freq_base, int neox);
void el_silu_mul(float *gate, const float *up, long n);
void el_softmax(float *x, int rows, int cols);
void el_hadamard(float *x, long rows, int dim);
void el_quantize_row(const float *x, void *dst, long n, int type);
void el_dequantize_row(const void *src, float *y, long n, int type);
void el_attention(const float *q, int n_q, const int32_t *q_pos, int n_head, int n_kv_head, int hd, float scale,
                  const el_kvblock *blocks, int n_blocks, float *out, float *lse);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "edgellm.native._kernels",
    '#include "kernels.h"',
    # setuptools insists on paths relative to setup.py (the working directory of a pip build)
    sources=[os.path.relpath(os.path.join(HERE, s)) for s in SOURCES],
    include_dirs=[os.path.relpath(HERE)],
    # fp-contract=off: the quantizers must round exactly like ggml's reference on every ISA
    extra_compile_args=["-O3", "-std=c11", "-pthread", "-ffp-contract=off", "-fno-math-errno", "-Wall"],
    extra_link_args=["-pthread"],
    libraries=["m"],
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=os.path.dirname(os.path.dirname(HERE)), verbose=False)

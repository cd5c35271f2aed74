#!/usr/bin/env bash
# Native kernel tests on an emulated Raspberry Pi: aarch64 CPython 3.11 (Debian 12 arm64 packages) under qemu
# user mode on an x86-64 Debian 12 host.
#
#   bash tools/pi-test.sh                       # Pi 5 (cortex-a76, NEON + dotprod) and Pi 4 (cortex-a72, NEON only)
#   PI_CPUS=cortex-a72 bash tools/pi-test.sh    # one CPU
#   bash tools/pi-test.sh -k matmul             # extra arguments go to pytest
#
# The extension is built for aarch64 by the emulated python itself (cffi -> setuptools -> the host cross compiler
# aarch64-linux-gnu-gcc, which qemu lets it exec) in a copy of the working tree under $PI_WORK, so the x86 build in
# the checkout is left alone. Each CPU runs the kernel tests, which cover both the best SIMD level it detects and
# the scalar path, then a smoke check with EDGELLM_FORCE_SCALAR=1.
# Set-up (first run only, needs root + apt): qemu-user-static, the cross gcc, and ~30 arm64 .debs unpacked into a
# sysroot ($PI_WORK/root); later runs reuse it. Timings under qemu say nothing about a real Pi.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
W=${PI_WORK:-/tmp/edgellm-pi}
ROOT=$W/root
SRC=$W/src
PY=$W/pi-python
CPUS=${PI_CPUS:-cortex-a76 cortex-a72}
# the layouts' kernels and the pool; not the model repack check, which starts a second python (qemu user mode
# runs only the one it was started with), nor the weight arena's, which loads the model (tokenizers is no arm64 .deb)
TESTS=(tests/test_native_kernels.py tests/test_quant.py tests/test_repack.py tests/test_pool.py tests/test_sampling.py
       --deselect tests/test_repack.py::test_model_repacks_on_first_use
       --deselect tests/test_repack.py::test_weight_arena_asks_for_huge_pages)

log() { printf '== %s\n' "$*"; }

setup() {
    [ -f "$W/.ready" ] && return
    log "set-up: host tools and an arm64 sysroot in $ROOT"
    [ "$(id -u)" = 0 ] || { echo "first run needs root (apt-get)" >&2; exit 1; }
    export DEBIAN_FRONTEND=noninteractive
    if ! command -v qemu-aarch64-static >/dev/null || ! command -v aarch64-linux-gnu-gcc >/dev/null; then
        apt-get update -qq
        apt-get install -y -q qemu-user-static gcc-aarch64-linux-gnu libc6-dev-arm64-cross >/dev/null
    fi
    if ! dpkg --print-foreign-architectures | grep -qx arm64; then
        dpkg --add-architecture arm64
    fi
    apt-get update -qq
    # the interpreter and its shared libraries (arm64), numpy, cffi's C backend and the headers to build against
    local arm64="libc6 libgcc-s1 gcc-12-base libpython3.11-minimal libpython3.11-stdlib libpython3.11
        libpython3.11-dev python3.11-minimal python3.11 python3-minimal python3 libexpat1 zlib1g libffi8
        libbz2-1.0 liblzma5 libcrypt1 libdb5.3 libncursesw6 libtinfo6 libreadline8 libsqlite3-0 libssl3 libuuid1
        libnsl2 libtirpc3 libgssapi-krb5-2 libkrb5-3 libk5crypto3 libkrb5support0 libkeyutils1 libcom-err2
        python3-numpy libblas3 liblapack3 libgfortran5 python3-cffi-backend"
    # architecture-independent: cffi's python part, pytest and setuptools (cffi's compiler driver)
    local indep="python3-cffi python3-pycparser python3-ply python3-pytest python3-pluggy python3-iniconfig
        python3-packaging python3-attr python3-more-itertools python3-py python3-pkg-resources
        python3-setuptools python3-distutils python3-lib2to3 media-types libtirpc-common"
    rm -rf "$W/debs" "$ROOT"
    mkdir -p "$W/debs" "$ROOT"
    (cd "$W/debs" && apt-get download -q -o APT::Sandbox::User=root $(printf '%s:arm64 ' $arm64) $indep >/dev/null)
    for deb in "$W"/debs/*.deb; do dpkg -x "$deb" "$ROOT"; done
    # what the blas/lapack maintainer scripts would do with update-alternatives (numpy needs libblas.so.3)
    ln -sf blas/libblas.so.3 "$ROOT/usr/lib/aarch64-linux-gnu/libblas.so.3"
    ln -sf lapack/liblapack.so.3 "$ROOT/usr/lib/aarch64-linux-gnu/liblapack.so.3"
    # Run the sysroot's interpreter by its path so sys.prefix and sysconfig (CC = aarch64-linux-gnu-gcc) point
    # into the sysroot; -L makes qemu resolve the arm64 dynamic loader and libraries there.
    cat >"$PY" <<EOF
#!/bin/sh
exec env -u PYTHONDONTWRITEBYTECODE CFLAGS="\${CFLAGS:-} -I$ROOT/usr/include" \\
    qemu-aarch64-static -cpu "\${PI_CPU:-cortex-a76}" -L "$ROOT" "$ROOT/usr/bin/python3.11" "\$@"
EOF
    chmod +x "$PY"
    "$PY" -c "import numpy, cffi, pytest" # also fills the sysroot's .pyc cache
    touch "$W/.ready"
}

# A fresh copy of the working tree (tracked and untracked, not ignored: no x86 objects) and an aarch64 build in it.
build() {
    log "copy $REPO -> $SRC and build the aarch64 extension"
    rm -rf "$SRC"
    mkdir -p "$SRC"
    (cd "$REPO" && git ls-files -z -c -o --exclude-standard |
        while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done |
        tar --null -T - -cf -) | tar -xf - -C "$SRC"
    (cd "$SRC" && PI_CPU=cortex-a72 "$PY" edgellm/native/build.py)   # the build itself must run on a Pi 4
    local so
    so=$(ls "$SRC"/edgellm/native/_kernels*.so)
    file "$so" | grep -q 'ARM aarch64' || { file "$so"; exit 1; }
    log "$(basename "$so"): $(aarch64-linux-gnu-objdump -d "$so" | grep -cw sdot) sdot instructions (dotprod table only)"
}

run_cpu() {
    local cpu=$1 want
    shift
    case $cpu in cortex-a76) want=11 ;; cortex-a72) want=10 ;; *) want= ;; esac
    log "$cpu: pytest ${TESTS[*]} $*"
    (cd "$SRC" && PI_CPU=$cpu "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}" "$@")
    log "$cpu: SIMD level and EDGELLM_FORCE_SCALAR=1"
    (cd "$SRC" && PI_CPU=$cpu "$PY" -c "
import numpy as np
from edgellm import native as N
from edgellm.quant import GGMLType as T
print('detected', N.simd_level(), N.SIMD_NAMES[N.simd_level()])
assert '$want' == '' or N.simd_level() == int('$want'), 'unexpected SIMD level on $cpu'
rng = np.random.default_rng(0)
W = rng.integers(0, 256, 64 * 4 * 20, dtype=np.uint8); f = W.view(np.float16).reshape(-1, 10); f[:, 0] = 0.01; f[:, 1] = -0.1
X = rng.standard_normal((3, 128)).astype(np.float32)
np.save('$W/y_$cpu.npy', N.matmul(W, T.Q4_1, 64, 128, X))
")
    (cd "$SRC" && PI_CPU=$cpu EDGELLM_FORCE_SCALAR=1 "$PY" -c "
import numpy as np
from edgellm import native as N
from edgellm.quant import GGMLType as T
assert N.simd_level() == 0, N.simd_level()
rng = np.random.default_rng(0)
W = rng.integers(0, 256, 64 * 4 * 20, dtype=np.uint8); f = W.view(np.float16).reshape(-1, 10); f[:, 0] = 0.01; f[:, 1] = -0.1
X = rng.standard_normal((3, 128)).astype(np.float32)
Y, ref = N.matmul(W, T.Q4_1, 64, 128, X), np.load('$W/y_$cpu.npy')
assert np.abs(Y - ref).max() <= 1e-5 * np.abs(ref).max(), np.abs(Y - ref).max()
print('forced scalar: level 0, Q4_1 matmul agrees with the SIMD level')
")
}

start=$SECONDS
setup
build
for cpu in $CPUS; do run_cpu "$cpu" "$@"; done
log "pi-test passed on: $CPUS ($((SECONDS - start)) s)"

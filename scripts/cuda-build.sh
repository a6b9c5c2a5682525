#!/usr/bin/env bash
# Builds router-svc, expert-svc and moe with candle's CUDA backend (the
# `cuda` feature), on a machine with no GPU and no CUDA toolkit installed.
#
#   scripts/cuda-build.sh            # build; prints where the binaries are
#   scripts/cuda-build.sh --bundle DIR   # also DIR/moe-cuda-bins.tar.xz, stripped
#
# Everything it installs lives outside the repository, under
# $MOE_CUDA_CACHE (default ~/.cache/moe-cuda): a Python venv holding
# NVIDIA's CUDA wheels from PyPI (nvcc and its parts, the runtime headers,
# cuBLAS, cuRAND, NVRTC), the unversioned library links the linker wants,
# and a stub libcuda.so (the driver library, which no wheel ships: the real
# one comes with the GPU machine's driver). The build goes to its own
# target directory, $CARGO_TARGET_DIR (default ~/.cache/moe-cuda-target),
# so that the workspace's target/ stays as it is.
#
# CUDA 13.0 by default: the GPU machines this was written for run driver
# 580 (CUDA 13.0), and candle loads its kernels as PTX, which a driver
# compiles only if it is at least as new as the nvcc that wrote it.
# cudarc 0.19 (candle 0.11's) accepts 11.4 to 13.4. CUDA_COMPUTE_CAP
# (default 90: H100/H200) sets the architecture of the kernels compiled
# ahead of time. docs/gpu.md has the details and the measured build time.
set -euo pipefail
cd "$(dirname "$0")/.."

bundle=""
while [ $# -gt 0 ]; do
  case "$1" in
    --bundle) bundle="${2:?--bundle needs a directory}"; shift 2 ;;
    -h | --help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (try --help)" >&2; exit 2 ;;
  esac
done

CUDA_VERSION="${CUDA_VERSION:-13.0}"
cache="${MOE_CUDA_CACHE:-$HOME/.cache/moe-cuda}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/moe-cuda-target}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"

# Wheel versions of one CUDA release. nvidia-cuda-crt holds the crt/
# headers nvcc includes (from 13.0 on they are a wheel of their own);
# nvidia-nvvm holds cicc and libdevice; cccl the cuda/std headers.
case "$CUDA_VERSION" in
  13.0) wheels=(nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
          nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88
          nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35)
        cudarc_version=13000 ;;
  13.4) wheels=(nvidia-cuda-nvcc==13.4.92 nvidia-cuda-crt==13.4.92 nvidia-nvvm==13.4.92
          nvidia-cuda-runtime==13.4.92 nvidia-cuda-cccl==13.3.5.0.6 nvidia-cuda-nvrtc==13.4.92
          nvidia-cublas==13.4.3.11 nvidia-curand==10.4.4.72)
        cudarc_version=13040 ;;
  *) echo "CUDA_VERSION=$CUDA_VERSION: this script knows 13.0 and 13.4" >&2; exit 2 ;;
esac

started=$SECONDS
step() { printf '\n== %s (%ds)\n' "$*" $((SECONDS - started)); }

step "CUDA $CUDA_VERSION wheels into $cache/venv-$CUDA_VERSION"
venv="$cache/venv-$CUDA_VERSION"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${wheels[@]}"
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
root="$site/nvidia/cu13"
[ -x "$root/bin/nvcc" ] || { echo "no nvcc under $root" >&2; exit 1; }

step "library links and a stub libcuda.so"
# The wheels ship only versioned names (libcublas.so.13); `-lcublas`
# wants the plain one.
for lib in "$root"/lib/lib*.so.*; do
  name=$(basename "$lib")
  plain="${name%%.so.*}.so"
  [ -e "$root/lib/$plain" ] || ln -s "$name" "$root/lib/$plain"
done
# candle's cudarc links the driver library (libcuda.so.1) at build time.
# A stub that defines every driver function cudarc declares satisfies the
# linker; at run time the loader finds the driver's real libcuda.so.1.
cargo fetch --quiet
cudarc_src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* | sort -V | tail -1)
mkdir -p "$root/lib/stubs"
if [ ! -e "$root/lib/stubs/libcuda.so" ]; then
  grep -ohE '^\s+fn cu[A-Za-z0-9_]+\(' "$cudarc_src/src/driver/sys/mod.rs" |
    sed -E 's/^\s+fn (cu[A-Za-z0-9_]+)\(/int \1(void) { return 999; }/' | sort -u \
    >"$root/lib/stubs/libcuda_stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$root/lib/stubs/libcuda.so" \
    "$root/lib/stubs/libcuda_stub.c"
fi

step "cargo build --release --features cuda (router-svc, expert-svc, moe) into $CARGO_TARGET_DIR"
export CUDA_ROOT="$root" CUDA_PATH="$root" CUDA_HOME="$root"
export PATH="$root/bin:$PATH"
export NVCC="$root/bin/nvcc"
export CUDARC_CUDA_VERSION="$cudarc_version"
# nvcc finds cicc, libdevice and the headers relative to itself (its
# nvcc.profile); the cccl headers need naming.
export NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:-} -I$root/include -I$root/include/cccl"
export LIBRARY_PATH="$root/lib:$root/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
cargo build --release --features cuda -p router-svc -p expert-svc -p moe

out="$CARGO_TARGET_DIR/release"
step "built"
for bin in router-svc expert-svc moe; do
  ls -l "$out/$bin"
done
echo "their CUDA libraries (found at run time through LD_LIBRARY_PATH):"
ldd "$out/router-svc" | grep -E 'cuda|cublas|curand|nvrtc' || true
if [ -n "$bundle" ]; then
  # Stripped they are still ~50 MB each (every binary embeds candle's
  # kernels); xz brings the three to ~21 MB, which fits the 64 MiB that a
  # working tree may carry to a GPU machine. scripts/gpu-check.sh unpacks
  # it (with python3's tarfile, so no xz is needed there).
  step "bundle: stripped, in $bundle/moe-cuda-bins.tar.xz"
  mkdir -p "$bundle"
  stripped=$(mktemp -d)
  for bin in router-svc expert-svc moe; do
    strip -o "$stripped/$bin" "$out/$bin"
  done
  tar -C "$stripped" -cf - router-svc expert-svc moe | xz -T0 -6 >"$bundle/moe-cuda-bins.tar.xz"
  rm -rf "$stripped"
  ls -l "$bundle"
fi
printf '\nCUDA binaries: %s/{router-svc,expert-svc,moe} (took %ds)\n' "$out" $((SECONDS - started))

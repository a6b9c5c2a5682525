#!/usr/bin/env bash
# The GPU check, one command on a machine with an NVIDIA GPU and the CUDA
# binaries that scripts/cuda-build.sh built (no Rust, no network needed:
# the binaries, this repository's fixtures, python3 without packages, and
# the CUDA libraries the binaries load, which it looks for):
#
#   scripts/gpu-check.sh [--bin DIR] [--gpu N] [--out DIR] [--requests 128] [--cpu]
#
# 1. parity: each fixture in tests/fixtures (recorded with transformers)
#    served by `moe up --gpus N` (router and one expert-svc per expert on
#    cuda:N): in f32 the reference's greedy tokens with logprobs within
#    1e-4; in bf16 (MOE_DTYPE=bf16) each teacher-forced step's logprob
#    within 0.5 nats and 85% of its tokens (scripts/parity.py says why).
# 2. a cluster of the small preset (16 expert processes sharing the GPU)
#    and `moe bench` against it, in bf16 and in f32: tokens/s, TTFT, ITL,
#    model FLOP/s against the GPU's stated dense peak.
# Ends with a summary; exits 1 if a parity check failed or a step broke.
#
# --bin DIR: the binaries, or the moe-cuda-bins.tar.xz that
#   `scripts/cuda-build.sh --bundle DIR` writes (default: .gpu-bundle/, then
#   ~/.cache/moe-cuda-target/release). --cpu: the same steps on the CPU
#   with CPU binaries (default target/debug; bf16 with --kernels generic),
#   which is how this script is tested on a machine without a GPU.
# MOE_DTYPE is set for each step; other MOE_* variables pass through.
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

bin="${MOE_BIN:-}"
gpu=0
out=""
requests=128
cpu=false
while [ $# -gt 0 ]; do
  case "$1" in
    --bin) bin="$2"; shift 2 ;;
    --gpu) gpu="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --requests) requests="$2"; shift 2 ;;
    --cpu) cpu=true; shift ;;
    -h | --help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (try --help)" >&2; exit 2 ;;
  esac
done

started=$SECONDS
step() { printf '\n== %s (%ds)\n' "$*" $((SECONDS - started)); }
summary=()
failed=0
note() { summary+=("$*"); }

if [ -z "$bin" ]; then
  if $cpu; then
    candidates=(target/debug)
  else
    candidates=(.gpu-bundle "$HOME/.cache/moe-cuda-target/release")
  fi
  for dir in "${candidates[@]}"; do
    if [ -x "$dir/router-svc" ] && [ -x "$dir/expert-svc" ] && [ -x "$dir/moe" ]; then
      bin="$dir"
      break
    fi
  done
fi
work=$(mktemp -d /tmp/moe-gpu-check.XXXXXX)
# scripts/cuda-build.sh --bundle DIR leaves the binaries compressed.
bundle="${bin:-.gpu-bundle}/moe-cuda-bins.tar.xz"
if { [ -z "$bin" ] || [ ! -x "$bin/moe" ]; } && [ -f "$bundle" ]; then
  python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="data")' \
    "$bundle" "$work/bin" || exit 2
  bin="$work/bin"
fi
[ -n "$bin" ] || { echo "no router-svc, expert-svc and moe found: pass --bin DIR" >&2; exit 2; }
bin=$(cd "$bin" && pwd)
out="${out:-$work}"
mkdir -p "$out"
echo "binaries: $bin; logs: $out"

if $cpu; then
  gpus=()
  device=cpu
else
  gpus=(--gpus "$gpu")
  device="cuda:$gpu"
  step "GPU and CUDA libraries"
  nvidia-smi -L || { echo "nvidia-smi failed: no GPU or driver here" >&2; exit 2; }
  # The binaries load cuBLAS, cuRAND, NVRTC and the runtime (CUDA 13,
  # sonames *.so.13 / libcurand.so.10) besides the driver: look where a
  # toolkit or Python's NVIDIA wheels put them.
  missing() { ldd "$bin/router-svc" | grep 'not found'; }
  if missing >/dev/null; then
    dirs=("${CUDA_LIBS:-}" /usr/local/nvidia/lib64 /usr/local/cuda/lib64
      /usr/local/cuda/targets/x86_64-linux/lib)
    while read -r path; do
      dirs+=("$path/nvidia/cu13/lib")
    done < <(python3 -c 'import sys; print("\n".join(p for p in sys.path if p))' 2>/dev/null)
    for dir in "${dirs[@]}"; do
      [ -n "$dir" ] && [ -d "$dir" ] && LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    done
    export LD_LIBRARY_PATH
  fi
  if missing; then
    echo "CUDA libraries above not found: set CUDA_LIBS to the folder holding them" >&2
    exit 2
  fi
  ldd "$bin/router-svc" | grep -E 'libcu|nvrtc'
fi

# Starts `moe up` on MODEL (further arguments go to it), waits until it
# serves, and sets $uri and $cluster; the log goes to $out/NAME.log.
start_cluster() {
  local model=$1 name=$2
  shift 2
  "$bin/moe" up --model "$model" --listen 127.0.0.1:0 "${gpus[@]}" "$@" \
    >"$out/$name.log" 2>&1 &
  cluster=$!
  for _ in $(seq 600); do
    uri=$(grep -o 'router at http://[0-9.:]*' "$out/$name.log" | head -1 | cut -d' ' -f3)
    [ -n "$uri" ] && return 0
    kill -0 "$cluster" 2>/dev/null || break
    sleep 0.5
  done
  echo "the cluster did not come up; the end of $out/$name.log:" >&2
  tail -20 "$out/$name.log" >&2
  stop_cluster
  return 1
}
stop_cluster() {
  kill -TERM "$cluster" 2>/dev/null
  wait "$cluster" 2>/dev/null
}

# `moe up` flags for weights in dtype $1 (MOE_DTYPE, which the router and
# the experts read, sets the dtype): bf16 on the CPU needs the generic
# kernels (the fast ones are f32 only).
dtype_flags() {
  if [ "$1" != f32 ] && $cpu; then
    echo "--kernels generic"
  fi
}

for reference in tests/fixtures/*/reference.json; do
  fixture=$(dirname "$reference")
  name=$(basename "$fixture")
  for dtype in f32 bf16; do
    step "parity: $name in $dtype on $device"
    mode=exact
    [ "$dtype" = f32 ] || mode=close
    (
      export MOE_DTYPE=$dtype
      start_cluster "$repo/$fixture" "parity-$name-$dtype" $(dtype_flags "$dtype") || exit 1
      python3 scripts/parity.py --moe "$bin/moe" --addr "$uri" --reference "$reference" \
        --mode "$mode" --label "$name $dtype on $device"
      rc=$?
      stop_cluster
      exit $rc
    ) >"$out/parity-$name-$dtype.out" 2>&1 || failed=1
    cat "$out/parity-$name-$dtype.out"
    line=$(grep -E '^(PASS|FAIL)' "$out/parity-$name-$dtype.out" | head -1)
    note "${line:-FAIL $name $dtype on $device: no verdict (see $out/parity-$name-$dtype.out)}"
  done
done

step "the small preset's checkpoint"
small="$work/small"
"$bin/moe" init "$small" --preset small --seed 0 >/dev/null || { echo "moe init failed" >&2; exit 1; }

for dtype in bf16 f32; do
  step "moe bench: 16 expert processes on $device, $dtype weights, $requests requests"
  export MOE_DTYPE=$dtype
  if start_cluster "$small" "bench-$dtype" $(dtype_flags "$dtype"); then
    experts=$(grep -c ' at .*(pid ' "$out/bench-$dtype.log")
    "$bin/moe" bench --addr "$uri" --model "$small" --requests "$requests" --json \
      >"$out/bench-$dtype.json" 2>"$out/bench-$dtype.err"
    rc=$?
    $cpu || nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader \
      >"$out/bench-$dtype.gpu" 2>/dev/null
    stop_cluster
    if [ $rc -eq 0 ]; then
      line=$(python3 - "$out/bench-$dtype.json" "$dtype" "$device" "$experts" \
        "$(cat "$out/bench-$dtype.gpu" 2>/dev/null)" <<'EOF'
import json, sys
path, dtype, device, experts, gpu = sys.argv[1:6]
report = json.load(open(path))
run = report["runs"][0]
# H200 SXM, dense, by the datasheet: bf16 tensor cores ~989 TFLOP/s,
# f32 (no tensor cores) ~67 TFLOP/s. On the CPU: bench's measured peak.
if device.startswith("cuda"):
    peak, against = {"bf16": 989e12, "f16": 989e12, "f32": 67e12}[dtype], "H200 datasheet peak"
else:
    peak, against = report["matmul_peak"]["flops_per_s"], "measured CPU matmul peak"
flops = run["model_flops_per_s"]
print(f"bench {dtype} on {device} ({experts} expert processes): "
      f"{run['output_tokens_per_s']:.0f} tok/s, "
      f"TTFT p50 {run['ttft']['p50_ms']:.1f} ms p99 {run['ttft']['p99_ms']:.1f} ms, "
      f"ITL p50 {run['itl']['p50_ms']:.2f} ms p99 {run['itl']['p99_ms']:.2f} ms, "
      f"{flops / 1e9:.1f} GFLOP/s = {100 * flops / peak:.4f}% of {peak / 1e9:.0f} GFLOP/s ({against})"
      + (f"; GPU memory used, load: {gpu}" if gpu else ""))
EOF
)
      note "$line"
      echo "$line"
    else
      failed=1
      note "FAIL bench $dtype on $device: $(tail -1 "$out/bench-$dtype.err")"
      tail -5 "$out/bench-$dtype.err"
    fi
  else
    failed=1
    note "FAIL bench $dtype on $device: the cluster did not come up (see $out/bench-$dtype.log)"
  fi
done

printf '\n== summary (%ds; logs in %s)\n' $((SECONDS - started)) "$out"
printf '%s\n' "${summary[@]}" | tee "$out/summary.txt"
exit $failed

#!/usr/bin/env bash
# A/B of builds: how the "measured and not kept" table of docs/decisions.md
# was measured. Each BUILD_DIR holds a build's `moe`, `router-svc` and
# `expert-svc` (copy them out of target/debug before rebuilding). For every
# build it starts a distributed cluster (`moe up`) and an in-process one
# (`moe up --in-process`), all up at once, so that both come up with the
# launcher's own flags, then
# runs `moe bench` on each cluster once per cycle, reversing the order every
# other cycle, so that the machine's drift (it is shared and noisy) weighs
# on every build and mode alike. Prints each run, then per build the mean
# tokens/s of each mode and the ratio distributed / in-process.
#
#   cp target/debug/{moe,router-svc,expert-svc} /tmp/base   # before a change
#   cp target/debug/{moe,router-svc,expert-svc} /tmp/new    # after it
#   bench/ab.sh /tmp/base /tmp/new
#   CYCLES=6 BENCH_ARGS="--requests 64 --prompt-tokens 8 --max-tokens 128" bench/ab.sh /tmp/base /tmp/new
#   bench/ab.sh /tmp/base /tmp/base,--expert-transport=unix    # one build, two setups
#
# A BUILD_DIR may carry `moe up` flags for both of its clusters after a
# comma.
# Environment: MODEL (a checkpoint, made with `moe init --preset small` when
# absent), CYCLES (default 4), BENCH_ARGS (default: the standard workload
# of docs/performance.md at concurrency 32), PORT (first of 2 per build).
# Each cluster holds the whole model: 2 builds take ~5 GB of memory.
# Not part of CI.
set -euo pipefail
[ $# -ge 1 ] || { awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0"; exit 2; }

MODEL=${MODEL:-moe-models/small}
CYCLES=${CYCLES:-4}
BENCH_ARGS=${BENCH_ARGS:-"--concurrency 32 --requests 128 --prompt-tokens 128 --max-tokens 64"}
PORT=${PORT:-52100}
LOGS=$(mktemp -d)
BUILDS=()    # directories
UP_FLAGS=()  # their `moe up` flags, comma-separated
for arg in "$@"; do
    BUILDS+=("${arg%%,*}")
    [[ $arg == *,* ]] && UP_FLAGS+=("${arg#*,}") || UP_FLAGS+=("")
done

[ -f "$MODEL/config.json" ] || "${BUILDS[0]}/moe" init "$MODEL" --preset small

servers=()
stop() {
    kill "${servers[@]}" 2>/dev/null || true
    wait 2>/dev/null || true
}
trap stop EXIT

# "build mode port" per cluster; mode d = distributed, i = in-process.
clusters=()
for b in "${!BUILDS[@]}"; do
    dir=${BUILDS[$b]}
    distributed=$((PORT + 2 * b))
    in_process=$((distributed + 1))
    IFS=, read -r -a up_flags <<< "${UP_FLAGS[$b]}"
    "$dir/moe" up --model "$MODEL" --listen "127.0.0.1:$distributed" "${up_flags[@]}" \
        > "$LOGS/distributed-$b.log" 2>&1 &
    servers+=($!)
    if "$dir/moe" up --help | grep -q -- --in-process; then
        "$dir/moe" up --model "$MODEL" --listen "127.0.0.1:$in_process" --in-process \
            "${up_flags[@]}" > "$LOGS/in-process-$b.log" 2>&1 &
    else # a build from before `moe up --in-process`
        "$dir/router-svc" --model "$MODEL" --listen "127.0.0.1:$in_process" --sched-batch \
            --local-experts > "$LOGS/in-process-$b.log" 2>&1 &
    fi
    servers+=($!)
    clusters+=("$b d $distributed" "$b i $in_process")
done

bench() { # build port extra-args...
    local dir=${BUILDS[$1]} port=$2
    shift 2
    "$dir/moe" bench --addr "http://127.0.0.1:$port" --model "$MODEL" --json "$@"
}

# Ready once a small request goes through (the first loads the weights).
for cluster in "${clusters[@]}"; do
    read -r b mode port <<< "$cluster"
    for attempt in $(seq 120); do
        bench "$b" "$port" --concurrency 4 --requests 4 --prompt-tokens 16 --max-tokens 4 \
            > /dev/null 2>&1 && break
        [ "$attempt" -lt 120 ] || { echo "build $b ($mode) never served; logs in $LOGS" >&2; exit 1; }
        sleep 1
    done
done

RESULTS="$LOGS/results.txt"
for cycle in $(seq "$CYCLES"); do
    order=("${clusters[@]}")
    if [ $((cycle % 2)) -eq 0 ]; then
        order=()
        for ((i = ${#clusters[@]} - 1; i >= 0; i--)); do order+=("${clusters[$i]}"); done
    fi
    for cluster in "${order[@]}"; do
        read -r b mode port <<< "$cluster"
        # shellcheck disable=SC2086 # BENCH_ARGS is a list of flags
        bench "$b" "$port" $BENCH_ARGS | python3 -c '
import json, sys
cycle, build, mode = sys.argv[1:]
report = json.load(sys.stdin)
run = report["runs"][0]
print(cycle, build, mode, round(run["output_tokens_per_s"], 1), run["requests_failed"],
      round(run["itl"]["p50_ms"], 1), round(report["matmul_peak"]["flops_per_s"] / 1e9, 1))
' "$cycle" "$b" "$mode" | tee -a "$RESULTS"
    done
done

echo "cycle build mode tok/s failed itl_p50_ms peak_gflops: above; per build:"
python3 - "$RESULTS" "$@" <<'PY'
import sys
from collections import defaultdict
results, builds = sys.argv[1], sys.argv[2:]
rates = defaultdict(list)
for line in open(results):
    cycle, build, mode, rate = line.split()[:4]
    rates[int(build), mode].append(float(rate))
for b, name in enumerate(builds):
    d, i = rates[b, "d"], rates[b, "i"]
    mean_d, mean_i = sum(d) / len(d), sum(i) / len(i)
    per_cycle = " ".join(f"{x / y:.3f}" for x, y in zip(d, i))
    print(f"{name}: distributed {mean_d:.1f} tok/s, in-process {mean_i:.1f}, "
          f"ratio {mean_d / mean_i:.3f} (cycles {per_cycle})")
PY

#!/usr/bin/env bash
# The standard workload of docs/performance.md (small preset, 128-token
# prompts, 64 output tokens, greedy) against mistral.rs's OpenAI-compatible
# server (CPU, f32) and against moe-serve's distributed mode, on the same
# checkpoint, through the same load generator (`moe bench`); prints
# tokens/s of each and the ratio.
# Not part of CI: the first run installs mistralrs-cli (~16 min on 2 cores).
#
#   bench/mistralrs.sh                      # concurrency 16 and 32
#   CONCURRENCIES="16 32 64" REQUESTS=128 bench/mistralrs.sh
#
# Environment: MODEL (checkpoint dir, made with `moe init --preset small`
# when absent), PORT, REQUESTS, CONCURRENCIES, MISTRALRS_ROOT (where
# mistralrs-cli is installed when not on PATH).
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${MODEL:-moe-models/small}
PORT=${PORT:-8089}
REQUESTS=${REQUESTS:-128}
CONCURRENCIES=${CONCURRENCIES:-"16 32"}
MISTRALRS_ROOT=${MISTRALRS_ROOT:-$HOME/.cache/moe-serve/mistralrs}
OUT=target/bench
mkdir -p "$OUT"

MISTRALRS=$(command -v mistralrs || echo "$MISTRALRS_ROOT/bin/mistralrs")
if [ ! -x "$MISTRALRS" ]; then
    echo "installing mistralrs-cli 0.8.1 into $MISTRALRS_ROOT"
    cargo install --locked mistralrs-cli --version 0.8.1 --root "$MISTRALRS_ROOT"
fi
cargo build --workspace
MOE=./target/debug/moe
[ -f "$MODEL/config.json" ] || "$MOE" init "$MODEL" --preset small

# mistral.rs first, alone on the machine; it is stopped before moe-serve runs.
# Its prefix cache is off: moe-serve has none, and with it on mistral.rs
# 0.8.1 panicked mid-run ("shape mismatch on dim 2, 512 <> 1024" in
# kv_cache clone_in_cache), failing the requests in flight.
"$MISTRALRS" serve --cpu --host 127.0.0.1 -p "$PORT" --max-seqs 64 --prefix-cache-n 0 \
    text -m "$MODEL" --dtype f32 > "$OUT/mistralrs.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 300); do
    curl -sf "http://127.0.0.1:$PORT/v1/models" > /dev/null && break
    kill -0 $SERVER 2>/dev/null || { cat "$OUT/mistralrs.log"; exit 1; }
    sleep 1
done
for c in $CONCURRENCIES; do
    "$MOE" bench --model "$MODEL" --openai "http://127.0.0.1:$PORT" \
        --concurrency "$c" --requests "$REQUESTS" --json > "$OUT/mistralrs-c$c.json"
done
kill $SERVER
wait $SERVER 2>/dev/null || true

for c in $CONCURRENCIES; do
    "$MOE" bench --model "$MODEL" --concurrency "$c" --requests "$REQUESTS" \
        --json > "$OUT/moe-c$c.json"
done

python3 - "$OUT" $CONCURRENCIES <<'PY'
import json, sys
out, concurrencies = sys.argv[1], sys.argv[2:]
print(f"{'concurrency':>11} {'moe-serve tok/s':>16} {'mistral.rs tok/s':>17} {'ratio':>6}")
for c in concurrencies:
    ours = json.load(open(f"{out}/moe-c{c}.json"))["runs"][0]["output_tokens_per_s"]
    theirs = json.load(open(f"{out}/mistralrs-c{c}.json"))["runs"][0]["output_tokens_per_s"]
    print(f"{c:>11} {ours:>16.1f} {theirs:>17.1f} {ours / theirs:>6.2f}")
PY

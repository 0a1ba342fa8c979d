#!/usr/bin/env bash
# Figures for mobile/README.md: size of the release cdylib built with a size-tuned profile, time
# from start_proxy() to a listening port, and idle memory, threads, CPU and wake-ups of a process
# that runs nothing but the mobile library (mobile/examples/bench_host.rs, `proxy` mode),
# before and after traffic. Everything runs on loopback: the upstream is the library's stand-in
# gated host (`bench_host upstream`, a separate process, so it is not counted).
#
# Knobs (environment): CARGO_TARGET_DIR, REQUESTS through the proxy (1000), IDLE seconds for
# each of the two CPU and wake-up windows (30), BENCH_LAN (unset) a LAN route for the profile:
# `stand-in` (the stand-in's own address, 127.0.0.1:PORT, verified as `localhost`: the route
# at home) or an address (a refused one, e.g. 127.0.0.1:9, is the route away): the idle figures
# then hold with a LAN route configured, and the table names the route the requests took.
#
# The size-tuned profile is defined here on the command line (`--config`), so the workspace's
# Cargo.toml keeps one set of profiles: `mobile` = release + opt-level "z", fat LTO, one codegen
# unit, symbols stripped. Panics stay `unwind` so UniFFI can turn one into an exception.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
REQUESTS=${REQUESTS:-1000}
IDLE=${IDLE:-30}
PROFILE=(
  --profile mobile
  --config 'profile.mobile.inherits="release"'
  --config 'profile.mobile.opt-level="z"'
  --config 'profile.mobile.lto="fat"'
  --config 'profile.mobile.codegen-units=1'
  --config 'profile.mobile.strip="symbols"'
)

log() { printf 'bench: %s\n' "$*" >&2; }

cd "$ROOT"
log "building the cdylib and bench_host with the size-tuned profile (slow: fat LTO)"
cargo build -q -p credproxy-mobile --lib --example bench_host --target-dir "$TARGET_DIR" "${PROFILE[@]}"
OUT="$TARGET_DIR/mobile"
LIB="$OUT/libcredproxy_mobile.so"
HOST="$OUT/examples/bench_host"

work=$(mktemp -d)
pids=()
cleanup() {
  exec 3>&- 5>&-
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# Each child reads a FIFO on stdin (it runs until that closes) and answers on a FIFO stdout,
# so the script waits on lines, never on timers.
mkfifo "$work/up.in" "$work/up.out" "$work/px.in" "$work/px.out"
export BENCH_CA_FILE="$work/ca.pem"
"$HOST" upstream <"$work/up.in" >"$work/up.out" &
pids+=($!)
exec 3>"$work/up.in" 4<"$work/up.out"
read -r BENCH_URL BENCH_PASSWORD <&4
export BENCH_URL BENCH_PASSWORD
[ "${BENCH_LAN:-}" != stand-in ] || export BENCH_LAN="127.0.0.1:${BENCH_URL##*:}"
log "upstream stand-in at $BENCH_URL"

"$HOST" proxy <"$work/px.in" >"$work/px.out" &
proxy_pid=$!
pids+=("$proxy_pid")
exec 5>"$work/px.in" 6<"$work/px.out"
declare -A figure
while read -r key a b <&6; do
  figure[$key]="$a${b:+ $b}"
  [ "$key" = ready ] && break
done
port=${figure[ready]}

rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$proxy_pid/status"; }
threads() { ls "/proc/$proxy_pid/task" | wc -l; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$proxy_pid/stat"; }
# "TID SWITCHES" per thread; wake-ups are summed over threads alive at both ends of a window.
switches() {
  for task in /proc/"$proxy_pid"/task/*; do
    awk -v tid="${task##*/}" '/ctxt_switches/ {n += $2} END {print tid, n}' "$task/status"
  done
}
wakeups() { awk 'NR == FNR {before[$1] = $2; next} $1 in before {n += $2 - before[$1]} END {print n + 0}' "$1" "$2"; }

rss_fresh=$(rss_kib)
threads_fresh=$(threads)

# Traffic: REQUESTS pings over keep-alive connections (one curl, many URLs), plus a check
# that the proxy really answers through the gate.
curl -fsS "http://127.0.0.1:$port/api/server/ping" | grep -q pong
for _ in $(seq "$REQUESTS"); do
  printf 'url = "http://127.0.0.1:%s/api/server/ping"\noutput = "/dev/null"\n' "$port"
done >"$work/curl.cfg"
start_ns=$(date +%s%N)
curl -fsS --config "$work/curl.cfg"
traffic_ms=$(( ($(date +%s%N) - start_ns) / 1000000 ))
rss_busy=$(rss_kib)
threads_busy=$(threads)

# Idle: no request for two windows of IDLE seconds each; count CPU ticks and context switches
# (wake-ups) in each. The first starts after the runtime's blocking thread (used for DNS) has
# timed out (10 s) and holds the one-off closing of the pooled upstream connections (60 s
# after their last use); the second is the steady idle that follows (0 and 0 when nothing polls).
sleep 12
threads_settled=$(threads)
ticks0=$(cpu_ticks); switches >"$work/sw0"
sleep "$IDLE"
ticks1=$(cpu_ticks); switches >"$work/sw1"
rss_idle=$(rss_kib)
sleep "$IDLE"
ticks2=$(cpu_ticks); switches >"$work/sw2"
clk=$(getconf CLK_TCK)
exec 5>&-
read -r _ served served_bytes route <&6
[ "$served" -eq $((REQUESTS + 1)) ] || { log "the proxy counted $served requests, expected $((REQUESTS + 1))"; exit 1; }

read -r cold_ret cold_conn <<<"${figure[cold_start_us]}"
read -r warm_ret warm_conn <<<"${figure[warm_start_median_us]}"
size=$(stat -c %s "$LIB")
gz=$(gzip -9c "$LIB" | wc -c)
mib() { awk -v b="$1" 'BEGIN {printf "%.2f MiB", b / 1048576}'; }

cat <<EOF
| figure | value |
| --- | --- |
| release cdylib \`libcredproxy_mobile.so\` (x86_64, opt-level z, fat LTO, stripped) | $(mib "$size") ($(mib "$gz") gzip -9) |
| start_proxy() to listening, first start in the process | $((cold_ret / 1000)).$(( (cold_ret % 1000) / 100 )) ms (connect accepted at $((cold_conn / 1000)).$(( (cold_conn % 1000) / 100 )) ms) |
| start_proxy() to listening, median of 50 later starts | $warm_ret µs (connect accepted at $warm_conn µs) |
| RSS of the process, idle right after start | $((rss_fresh / 1024)).$(( (rss_fresh % 1024) * 10 / 1024 )) MiB, $threads_fresh threads |
| RSS after $REQUESTS requests in $traffic_ms ms (proxy counted $served, $served_bytes bytes down; LAN route: ${BENCH_LAN:-none}, route in use: $route) | $((rss_busy / 1024)).$(( (rss_busy % 1024) * 10 / 1024 )) MiB, $threads_busy threads |
| RSS after $((IDLE + 12)) s idle | $((rss_idle / 1024)).$(( (rss_idle % 1024) * 10 / 1024 )) MiB, $threads_settled threads |
| CPU used in the first ${IDLE} s idle | $((ticks1 - ticks0)) ticks of 1/$clk s |
| context switches (wake-ups) in the first ${IDLE} s idle, all threads | $(wakeups "$work/sw0" "$work/sw1") |
| CPU used in the next ${IDLE} s idle | $((ticks2 - ticks1)) ticks of 1/$clk s |
| context switches (wake-ups) in the next ${IDLE} s idle, all threads | $(wakeups "$work/sw1" "$work/sw2") |
EOF

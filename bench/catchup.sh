#!/usr/bin/env bash
# bench/catchup.sh - issue #4's figures in one invocation: catch-up throughput
# to one client from N messages back (default arqd, then with a raised
# limits.max_inflight), next to raw reads of the same records from arqd's
# LMDB environment, and a reconnect storm of C clients resuming their
# sessions (then the same storm without resume, for comparison). See
# docs/benchmarks.md ("Catch-up and reconnect storm").
#
# Starts its own arqd for each part (fresh data directory under /var/tmp, not
# tmpfs), stops exactly the arqd it started (by PID) and removes the
# directory on exit and on Ctrl-C.
#
# Usage: bench/catchup.sh [BUILD_DIR]        (default: build; ~2 minutes)
# Environment: ARQD (default BUILD_DIR/programs/arqd: another build's server
#   against this arq-bench), N (1000000 messages), REPS (5 catch-ups per arqd),
#   TUNED_INFLIGHT (65536), STORM (10000 connections), STREAMS (100),
#   STORM_REPS (3), PERF=1 (perf record arqd during the default catch-ups;
#   report in the kept directory), KEEP=1 (keep the directory: JSON, logs).
set -euo pipefail

cd "$(dirname "$0")/.."
BUILD=${1:-build}
ARQD=${ARQD:-$BUILD/programs/arqd}
BENCH=$BUILD/bench/arq-bench
N=${N:-1000000}
REPS=${REPS:-5}
TUNED_INFLIGHT=${TUNED_INFLIGHT:-65536}
STORM=${STORM:-10000}
STREAMS=${STREAMS:-100}
STORM_REPS=${STORM_REPS:-3}

for tool in "$ARQD" "$BENCH"; do
    [ -x "$tool" ] || {
        echo "catchup.sh: $tool not built (ninja -C $BUILD)" >&2
        exit 2
    }
done
command -v jq >/dev/null || {
    echo "catchup.sh: jq not found" >&2
    exit 2
}
# Each side holds STORM sockets (arqd briefly more, while it notices the drop).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt $((STORM + 256)) ]; then
    echo "catchup.sh: ulimit -n is $(ulimit -n); STORM=$STORM needs more" >&2
    exit 2
fi

TMP=$(mktemp -d /var/tmp/arq-catchup.XXXXXX)
ARQD_PID=
PERF_PID=

stop_arqd() {
    if [ -n "$ARQD_PID" ]; then
        kill "$ARQD_PID" 2>/dev/null || true
        wait "$ARQD_PID" 2>/dev/null || true
        ARQD_PID=
    fi
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ -n "$PERF_PID" ]; then
        kill -INT "$PERF_PID" 2>/dev/null || true
        wait "$PERF_PID" 2>/dev/null || true
    fi
    stop_arqd
    if [ "${KEEP:-0}" = 1 ]; then
        echo "catchup.sh: kept $TMP" >&2
    else
        rm -rf "$TMP"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

load() { cut -d' ' -f1-3 /proc/loadavg; }

# start_arqd NAME ARGS...: a fresh data directory TMP/NAME; sets ARQD_PID, PORT.
start_arqd() {
    local name=$1
    shift
    "$ARQD" --port 0 --data-dir "$TMP/$name" --log-level warn --anonymous "$@" \
        >"$TMP/$name.out" 2>"$TMP/$name.log" &
    ARQD_PID=$!
    for _ in $(seq 100); do
        PORT=$(sed -n 's|^arqd listening on ws://[^:]*:\([0-9]*\)/ws.*|\1|p' "$TMP/$name.out")
        [ -n "$PORT" ] && return 0
        kill -0 "$ARQD_PID" 2>/dev/null || break
        sleep 0.1
    done
    echo "catchup.sh: arqd did not start:" >&2
    cat "$TMP/$name.log" >&2
    exit 1
}

echo "catchup.sh: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), $(nproc) CPUs, $(uname -sr)," \
    "checkout $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD -- \
        api broker wal replay programs 2>/dev/null || echo ' (server code modified)')"
echo "catchup.sh: server $ARQD ($("$ARQD" --version 2>&1 | head -1))"
echo "catchup.sh: data under $TMP ($(df --output=fstype "$TMP" | tail -1)), load $(load)"

# catchup NAME ARQD-ARGS...: N messages, then REPS catch-ups and the raw reads.
catchup() {
    local name=$1
    shift
    start_arqd "$name" --set server.max_connections=$((STORM + 1000)) "$@"
    echo
    echo "== catch-up, arqd $* (load $(load))"
    "$BENCH" --url "ws://127.0.0.1:$PORT/ws" --catchup "$N" --reps "$REPS" \
        --data-dir "$TMP/$name" --server-pid "$ARQD_PID" --json \
        >"$TMP/$name.json" 2> >(tee "$TMP/$name.txt" >&2) &
    local bench_pid=$!
    if [ "${PERF:-0}" = 1 ] && [ "$name" = cu-default ]; then
        # Wait for the first WAL catch-up read, then record the rest of the catch-ups.
        until [ "$(curl -s "http://127.0.0.1:$PORT/metrics" |
            sed -n 's/^arq_catchup_reads_total \([0-9]*\).*/\1/p')" -gt 0 ] 2>/dev/null; do
            kill -0 "$bench_pid" 2>/dev/null || break
            sleep 0.05
        done
        perf record -g -p "$ARQD_PID" -o "$TMP/perf-catchup.data" >/dev/null 2>&1 &
        PERF_PID=$!
    fi
    wait "$bench_pid"
    if [ -n "$PERF_PID" ]; then
        kill -INT "$PERF_PID" 2>/dev/null || true
        wait "$PERF_PID" 2>/dev/null || true
        PERF_PID=
        perf report -i "$TMP/perf-catchup.data" --no-children --sort dso,symbol --stdio \
            >"$TMP/perf-catchup.txt" 2>/dev/null || true
        echo "catchup.sh: perf report in $TMP/perf-catchup.txt (KEEP=1 keeps it)"
    fi
    stop_arqd
}

catchup cu-default
catchup cu-tuned --set limits.max_inflight="$TUNED_INFLIGHT"

# storms: one arqd, STORM_REPS storms with resume, then one without.
start_arqd storm --set server.max_connections=$((2 * STORM + 1000))
for i in $(seq "$STORM_REPS"); do
    echo
    echo "== storm $i, $STORM connections, resume (load $(load))"
    "$BENCH" --url "ws://127.0.0.1:$PORT/ws" --storm "$STORM" --streams "$STREAMS" \
        --server-pid "$ARQD_PID" --json >"$TMP/storm-$i.json" 2> >(tee "$TMP/storm-$i.txt" >&2)
done
echo
echo "== storm, $STORM connections, --no-resume (load $(load))"
"$BENCH" --url "ws://127.0.0.1:$PORT/ws" --storm "$STORM" --streams "$STREAMS" --no-resume \
    --server-pid "$ARQD_PID" --json >"$TMP/storm-noresume.json" \
    2> >(tee "$TMP/storm-noresume.txt" >&2)
stop_arqd

echo
echo "catchup.sh: summary ($(date -u '+%H:%M:%S UTC'), load $(load))"
printf '%-34s %10s %9s %9s %12s %12s %12s %12s %7s\n' "catch-up, $N msgs" "msgs/s" \
    "MB/s pay" "MB/s wire" "raw cursor/s" "idx+log get" "idx+log cur" "wal_read/s" "cu/raw"
for name in cu-default cu-tuned; do
    jq -r --arg n "$name" '
        [$n + " (max_inflight " + (.config.max_inflight|tostring) + ")",
         (.catchup_msgs_per_s|floor), (.catchup_payload_mb_per_s*10|floor/10),
         ((.catchup|map(.wire_mb_per_s)|sort|.[length/2|floor])*10|floor/10),
         (.raw.lmdb_cursor.records_per_s|floor), (.raw.lmdb_lookup.records_per_s|floor),
         (.raw.lmdb_cursors.records_per_s|floor), (.raw.wal_stream_read.records_per_s|floor),
         (.raw.lmdb_cursor.catchup_ratio*1000|floor/1000)] | @tsv' "$TMP/$name.json" |
        awk -F'\t' '{printf "%-34s %10s %9s %9s %12s %12s %12s %12s %7s\n",
                      $1, $2, $3, $4, $5, $6, $7, $8, $9}'
done
printf '%-22s %9s %9s %12s %12s %12s %9s\n' "storm, $STORM conns" resumed fresh \
    "welcomed ms" "resumed ms" "caught ms" "from drop"
for f in "$TMP"/storm-[0-9]*.json "$TMP/storm-noresume.json"; do
    jq -r --arg f "$(basename "$f" .json)" '
        [$f, .reconnect.resumed, .reconnect.fresh, (.reconnect.all_welcomed_ms|floor),
         (if .reconnect.all_resumed_ms then (.reconnect.all_resumed_ms|floor) else "-" end),
         (.reconnect.all_caught_up_ms|floor),
         ((.from_drop_ms.all_resumed // .from_drop_ms.all_caught_up)|floor)] | @tsv' "$f" |
        awk -F'\t' '{printf "%-22s %9s %9s %12s %12s %12s %9s\n", $1, $2, $3, $4, $5, $6, $7}'
done

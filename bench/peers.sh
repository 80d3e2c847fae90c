#!/usr/bin/env bash
# bench/peers.sh - durable publishes: ARQ (arqd + arq-bench) against Redis 7
# Streams (XADD, appendonly yes, appendfsync always) and NATS JetStream (file
# store; Debian's 2.9.10 cannot sync before it acks, so its acks are not
# durable) at the same connection counts and depths, then ARQ's publish ->
# delivery latency at half of its peak rate measured with the same subscribers
# attached (and, for reference, at half of the publish-only 50x16 peak), and
# Redis's (arq-redis-bench: XREAD BLOCK subscribers) at half of its own peak
# and at ARQ's rate. See docs/benchmarks.md ("Peers").
#
# Starts its own arqd, redis-server and nats-server on loopback with data
# directories under /var/tmp (not tmpfs, so fsync is real), stops exactly those
# processes (by PID) and removes the directories on exit and on Ctrl-C.
# Without nats-server (or arq-nats-bench) the NATS rows are skipped.
#
# Usage: bench/peers.sh [BUILD_DIR]     (default: build; ~2 minutes)
# Environment: SECONDS_PER_RUN (5), CONNS (50), SUBS (2, latency row),
#              ROUNDS (1): the ARQ/Redis rows are run ROUNDS times, alternating,
#              and judged by the median ratio (the machine's disk and CPU
#              drift between runs minutes apart),
#              KEEP=1 keeps the temporary directory (arqd/redis logs, JSON),
#              ARQD_ARGS="--set wal.apply_us=5000 ..." extra arqd flags.
set -euo pipefail

cd "$(dirname "$0")/.."
BUILD=${1:-build}
ARQD=$BUILD/programs/arqd
BENCH=$BUILD/bench/arq-bench
NATS_BENCH=$BUILD/bench/arq-nats-bench
REDIS_BENCH=$BUILD/bench/arq-redis-bench
RUN_S=${SECONDS_PER_RUN:-5}
CONNS=${CONNS:-50}
SUBS=${SUBS:-2}
ROUNDS=${ROUNDS:-1}
case $ROUNDS in '' | *[!0-9]* | 0)
    echo "peers.sh: ROUNDS must be a positive integer" >&2
    exit 2
    ;;
esac
PAYLOAD=$(printf '%*s' 128 '' | tr ' ' x) # 128-byte field value, like arq-bench's payload

for tool in "$ARQD" "$BENCH" "$REDIS_BENCH"; do
    [ -x "$tool" ] || {
        echo "peers.sh: $tool not built (ninja -C $BUILD)" >&2
        exit 2
    }
done
for tool in redis-server redis-benchmark redis-cli jq; do
    command -v "$tool" >/dev/null || {
        echo "peers.sh: $tool not found" >&2
        exit 2
    }
done

TMP=$(mktemp -d /var/tmp/arq-peers.XXXXXX)
ARQD_PID=
REDIS_PID=
NATS_PID=

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    for pid in $ARQD_PID $REDIS_PID $NATS_PID; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in $ARQD_PID $REDIS_PID $NATS_PID; do
        wait "$pid" 2>/dev/null || true
    done
    if [ "${KEEP:-0}" = 1 ]; then
        echo "peers.sh: kept $TMP" >&2
    else
        rm -rf "$TMP"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

load() { cut -d' ' -f1-3 /proc/loadavg; }

# How fast this disk syncs right now: plain LMDB, one put per synced commit (arq-wal-bench's
# batch-1 baseline, 0.5 s). Both brokers are bound by this, so it is printed before and after.
disk_check() {
    local wb=$BUILD/bench/arq-wal-bench
    [ -x "$wb" ] || return 0
    printf 'peers.sh: disk %s: plain LMDB synced single-put commits/s: %s (load %s)\n' "$1" \
        "$("$wb" --quick --batches 1 --threads none --only lmdb --dir "$TMP" --json 2>/dev/null |
            jq -r '.batch[0].lmdb_rps | floor')" "$(load)"
}

echo "peers.sh: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), $(nproc) CPUs, $(uname -sr)"
echo "peers.sh: data under $TMP ($(df --output=fstype "$TMP" | tail -1)), load $(load)"
echo "peers.sh: $(redis-server --version | cut -d' ' -f1-3)"
disk_check before

# ---- arqd --------------------------------------------------------------------
mkdir "$TMP/arq" "$TMP/redis"
# shellcheck disable=SC2086 # ARQD_ARGS is a list of flags
"$ARQD" --port 0 --data-dir "$TMP/arq" --anonymous ${ARQD_ARGS:-} >"$TMP/arqd.out" 2>"$TMP/arqd.err" &
ARQD_PID=$!
ARQ_URL=
for _ in $(seq 100); do
    ARQ_URL=$(sed -n '1s|^arqd listening on \(ws://[^ ]*\).*|\1|p' "$TMP/arqd.out")
    [ -n "$ARQ_URL" ] && break
    kill -0 "$ARQD_PID" 2>/dev/null || break
    sleep 0.1
done
if [ -z "$ARQ_URL" ]; then
    echo "peers.sh: arqd did not start:" >&2
    cat "$TMP/arqd.err" >&2
    exit 1
fi
echo "peers.sh: arqd pid $ARQD_PID at $ARQ_URL"

# ---- redis -------------------------------------------------------------------
REDIS_PORT=$(free_port)
redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --appendonly yes --appendfsync always \
    --save '' --dir "$TMP/redis" --daemonize no --protected-mode yes \
    >"$TMP/redis.log" 2>&1 &
REDIS_PID=$!
for _ in $(seq 100); do
    [ "$(redis-cli -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ] && break
    kill -0 "$REDIS_PID" 2>/dev/null || break
    sleep 0.1
done
if [ "$(redis-cli -p "$REDIS_PORT" ping 2>/dev/null)" != PONG ]; then
    echo "peers.sh: redis-server did not start:" >&2
    cat "$TMP/redis.log" >&2
    exit 1
fi
echo "peers.sh: redis-server pid $REDIS_PID on 127.0.0.1:$REDIS_PORT" \
    "(appendonly yes, appendfsync $(redis-cli -p "$REDIS_PORT" config get appendfsync | tail -1))"

# ---- nats-server (JetStream) ------------------------------------------------
NATS_URL=
if command -v nats-server >/dev/null && [ -x "$NATS_BENCH" ]; then
    NATS_PORT=$(free_port)
    mkdir "$TMP/nats"
    nats-server -a 127.0.0.1 -p "$NATS_PORT" -js -sd "$TMP/nats" >"$TMP/nats.log" 2>&1 &
    NATS_PID=$!
    for _ in $(seq 100); do
        grep -q "Server is ready" "$TMP/nats.log" 2>/dev/null && break
        kill -0 "$NATS_PID" 2>/dev/null || break
        sleep 0.1
    done
    if grep -q "Server is ready" "$TMP/nats.log"; then
        NATS_URL=nats://127.0.0.1:$NATS_PORT
        echo "peers.sh: $(nats-server --version) pid $NATS_PID at $NATS_URL" \
            "(JetStream file store, default sync: not before the ack)"
    else
        echo "peers.sh: nats-server did not start; NATS rows skipped:" >&2
        cat "$TMP/nats.log" >&2
    fi
else
    echo "peers.sh: no nats-server or $NATS_BENCH: NATS rows skipped"
fi

# nats_run NAME DEPTH: arq-nats-bench, JSON in $TMP/NAME.json
nats_run() {
    echo
    echo "== arq-nats-bench -c $CONNS -w $2 (load $(load))"
    "$NATS_BENCH" --url "$NATS_URL" -c "$CONNS" -w "$2" --seconds "$RUN_S" \
        --server-pid "$NATS_PID" --json >"$TMP/$1.json"
}

# arq_run NAME ARGS...: one arq-bench run; its text goes to the terminal, its JSON to $TMP/NAME.json
arq_run() {
    local name=$1
    shift
    echo
    echo "== arq-bench $* (load $(load))"
    "$BENCH" --url "$ARQ_URL" --seconds "$RUN_S" --server-pid "$ARQD_PID" --json "$@" \
        >"$TMP/$name.json"
}

# redis_run NAME PIPELINE: redis-benchmark XADD, sized to last about $RUN_S seconds
# (a 1-second calibration first); CSV in $TMP/NAME.csv
redis_run() {
    local name=$1 pipe=$2 n rps
    echo
    echo "== redis-benchmark -c $CONNS -P $pipe XADD (load $(load))"
    rps=$(redis-benchmark -h 127.0.0.1 -p "$REDIS_PORT" -c "$CONNS" -P "$pipe" -n $((2000 * pipe)) \
        --csv XADD bench '*' f "$PAYLOAD" | tail -1 | cut -d, -f2 | tr -d '"')
    n=$(awk -v r="$rps" -v s="$RUN_S" -v p="$pipe" \
        'BEGIN { n = int(r * s); m = 2000 * p; if (n < m) n = m; if (n > 5000000) n = 5000000; print n }')
    redis-benchmark -h 127.0.0.1 -p "$REDIS_PORT" -c "$CONNS" -P "$pipe" -n "$n" \
        --csv XADD bench '*' f "$PAYLOAD" | tail -1 >"$TMP/$name.csv"
    redis-cli -p "$REDIS_PORT" del bench >/dev/null
    # "test","rps","avg","min","p50","p95","p99","max" (latencies in ms, per request)
    awk -F'","' -v n="$n" '{ printf "   %s requests: %s XADD/s, p50 %s ms, p99 %s ms\n", n, $2, $5, $7 }' \
        "$TMP/$name.csv"
}

jqf() { jq -r "$1" "$TMP/$2.json"; }
redis_col() { awk -F'","' -v c="$2" '{ gsub(/"/, "", $c); print $c }' "$TMP/$1.csv"; }

# Round r's files are arq_w1.r, redis_p1.r, arq_w16.r, redis_p16.r; round 1
# is also linked as arq_w1, arq_w16 (the NATS table and the peak use it).
for r in $(seq "$ROUNDS"); do
    [ "$ROUNDS" -gt 1 ] && echo && echo "==== round $r of $ROUNDS"
    arq_run "arq_w1.$r" -c "$CONNS" -w 1 >&2
    redis_run "redis_p1.$r" 1
    arq_run "arq_w16.$r" -c "$CONNS" -w 16 >&2
    redis_run "redis_p16.$r" 16
done
ln -s arq_w1.1.json "$TMP/arq_w1.json"
ln -s arq_w16.1.json "$TMP/arq_w16.json"
if [ -n "$NATS_URL" ]; then
    nats_run nats_w1 1 >&2
    nats_run nats_w16 16 >&2
fi

# The latency goal is at half of "our peak rate": the peak of the same
# configuration, i.e. with the $SUBS subscribers attached (each delivery is
# work too); the publish-only peak's half is reported as well.
arq_run arq_peak_s -c "$CONNS" -w 16 -s "$SUBS" >&2
PEAK=$(jqf .publishes_per_s arq_w16)
PEAK_S=$(jqf .publishes_per_s arq_peak_s)
HALF=$(awk -v p="$PEAK_S" 'BEGIN { printf "%d", p / 2 }')
HALF0=$(awk -v p="$PEAK" 'BEGIN { printf "%d", p / 2 }')
arq_run arq_half -c "$CONNS" -s "$SUBS" --rate "$HALF" >&2
arq_run arq_half0 -c "$CONNS" -s "$SUBS" --rate "$HALF0" >&2

# Redis with the same subscribers (arq-redis-bench: XADD publishers, XREAD
# BLOCK readers): its own peak and half of it, and ARQ's half-peak rate. Its
# AOF rewrites are turned off for these rows (each forks and stalls Redis for
# tens of ms), so the peer is measured at its best.
redis-cli -p "$REDIS_PORT" config set auto-aof-rewrite-percentage 0 >/dev/null
redis_lat_run() { # NAME ARGS...
    local name=$1
    shift
    echo
    echo "== arq-redis-bench $* (load $(load))"
    "$REDIS_BENCH" --url "redis://127.0.0.1:$REDIS_PORT" --seconds "$RUN_S" \
        --server-pid "$REDIS_PID" --json "$@" >"$TMP/$name.json"
}
redis_lat_run redis_peak_s -c "$CONNS" -w 16 -s "$SUBS" >&2
RPEAK_S=$(jqf .publishes_per_s redis_peak_s)
RHALF=$(awk -v p="$RPEAK_S" 'BEGIN { printf "%d", p / 2 }')
# At ARQ's rate first: like arq_half it then follows its broker's peak run
# (the first open-loop run after a closed loop's ~200 MB of synced writes
# meets the slowest fsyncs), so the same-rate comparison is like for like.
redis_lat_run redis_at_arq -c "$CONNS" -s "$SUBS" --rate "$HALF" >&2
redis_lat_run redis_half -c "$CONNS" -s "$SUBS" --rate "$RHALF" >&2
redis-cli -p "$REDIS_PORT" config set auto-aof-rewrite-percentage 100 >/dev/null

# ---- summary -------------------------------------------------------------------
echo
echo "Durable publishes/s, 128-byte messages, $CONNS connections (load now $(load)):"
echo
printf '| %-10s | %14s | %11s | %13s | %11s | %9s | %12s |\n' \
    "c x w" "ARQ publ./s" "ARQ p99 ms" "Redis XADD/s" "Redis p99" "ARQ/Redis" "goal >= 1.0"
printf '|%s|%s:|%s:|%s:|%s:|%s:|%s|\n' "------------" "---------------" "------------" \
    "--------------" "------------" "----------" "--------------"
MEDIANS=
for depth in 1 16; do
    ratios=
    for r in $(seq "$ROUNDS"); do
        arq=arq_w$depth.$r
        redis=redis_p$depth.$r
        a=$(jqf .publishes_per_s "$arq")
        ap=$(jqf '.puback_latency.p99_us / 1000' "$arq")
        rr=$(redis_col "$redis" 2)
        rp=$(redis_col "$redis" 7)
        ratio=$(awk -v a="$a" -v r="$rr" 'BEGIN { printf "%.4f", a / r }')
        ratios="$ratios $ratio"
        label="$CONNS x $depth"
        [ "$ROUNDS" -gt 1 ] && label="$label, $r"
        # the table's ratio is rounded once, from the rates themselves (a
        # second rounding of $ratio could be off by 0.01)
        printf '| %-10s | %14.0f | %11.2f | %13.0f | %11s | %9s | %12s |\n' "$label" "$a" \
            "$ap" "$rr" "$rp" "$(awk -v a="$a" -v r="$rr" 'BEGIN { printf "%.2f", a / r }')" \
            "$(awk -v x="$ratio" 'BEGIN { print (x >= 1 ? "met" : "MISSED") }')"
    done
    med=$(tr ' ' '\n' <<<"$ratios" | grep . | sort -g | awk '{ v[NR] = $1 }
        END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.4f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }')
    MEDIANS="$MEDIANS $CONNS x $depth: median $(printf '%.2f' "$med") over $ROUNDS round(s)"
    MEDIANS="$MEDIANS ($(awk -v x="$med" 'BEGIN { print (x >= 1 ? "met" : "MISSED") }'));"
done
echo
[ "$ROUNDS" -gt 1 ] && echo "ARQ/Redis, the goal's verdict:$MEDIANS"
echo
echo "(ARQ: pubacks/s over a ${RUN_S} s window after 1 s warm-up, -w = publishes in flight per"
echo " connection; Redis: redis-benchmark -P = pipeline depth per connection, p99 in ms.)"
echo
if [ -n "$NATS_URL" ]; then
    echo "Against NATS JetStream (file store; its acks come before any fsync):"
    echo
    printf '| %-7s | %14s | %11s | %13s | %11s | %9s |\n' \
        "c x w" "ARQ publ./s" "ARQ p99 ms" "NATS acks/s" "NATS p99 ms" "ARQ/NATS"
    printf '|%s|%s:|%s:|%s:|%s:|%s:|\n' "---------" "---------------" "------------" \
        "--------------" "------------" "----------"
    while read -r depth arq nats; do
        a=$(jqf .publishes_per_s "$arq")
        ap=$(jqf '.puback_latency.p99_us / 1000' "$arq")
        nr=$(jqf .publishes_per_s "$nats")
        np=$(jqf '.ack_latency.p99_us / 1000' "$nats")
        printf '| %-7s | %14.0f | %11.2f | %13.0f | %11.2f | %9.2f |\n' "$CONNS x $depth" "$a" \
            "$ap" "$nr" "$np" "$(awk -v a="$a" -v r="$nr" 'BEGIN { print a / r }')"
    done <<'ROWS'
1 arq_w1 nats_w1
16 arq_w16 nats_w16
ROWS
    echo
    echo "(NATS: arq-nats-bench, JetStream publishes acknowledged per second, same window;"
    printf ' nats-server CPU %.0f%% / %.0f%%, arq-nats-bench %.0f%% / %.0f%% at -w 1 / -w 16.)\n' \
        "$(jqf '(.server_cpu // 0) * 100' nats_w1)" "$(jqf '(.server_cpu // 0) * 100' nats_w16)" \
        "$(jqf '.bench_cpu * 100' nats_w1)" "$(jqf '.bench_cpu * 100' nats_w16)"
    echo
fi
latency_row() { # NAME TEXT
    printf '%s:\n  achieved %.0f publishes/s; delivery p50 %.2f ms, p99 %.2f ms, p99.9 %.2f ms;' \
        "$2" "$(jqf .publishes_per_s "$1")" "$(jqf '.delivery_latency.p50_us / 1000' "$1")" \
        "$(jqf '.delivery_latency.p99_us / 1000' "$1")" "$(jqf '.delivery_latency.p999_us / 1000' "$1")"
    printf ' %s p99 %.2f ms\n' "${3:-puback}" "$(jqf '.puback_latency.p99_us / 1000' "$1")"
    printf '  CPU: server %.0f%% of a core, load generator %.0f%%\n' \
        "$(jqf '(.server_cpu // 0) * 100' "$1")" "$(jqf '.bench_cpu * 100' "$1")"
    printf '  machine stalls in the window (a 1 ms sleep > 4 ms late): %s, %s ms in all\n' \
        "$(jqf '.stalls.count // "?"' "$1")" "$(jqf '.stalls.ms // "?"' "$1")"
}
D99=$(jqf '.delivery_latency.p99_us / 1000' arq_half)
printf 'Peak with %s subscribers (%s x 16): %.0f publishes/s (publish-only peak %.0f/s)\n' \
    "$SUBS" "$CONNS" "$PEAK_S" "$PEAK"
latency_row arq_half "Latency at half of that peak: $HALF publishes/s open loop, $SUBS subscribers"
printf '  goal delivery p99 <= 2 ms: %s\n' "$(awk -v d="$D99" 'BEGIN { print (d <= 2 ? "met" : "MISSED") }')"
latency_row arq_half0 "For reference, half of the publish-only peak: $HALF0 publishes/s, $SUBS subscribers"
echo
printf 'Redis Streams, the same load (arq-redis-bench, XREAD BLOCK subscribers, AOF rewrites off):\n'
printf 'Peak with %s subscribers (%s x 16): %.0f XADD/s\n' "$SUBS" "$CONNS" "$RPEAK_S"
latency_row redis_half "Redis at half of its peak: $RHALF XADD/s open loop, $SUBS subscribers" "XADD reply"
latency_row redis_at_arq "Redis at ARQ's half-peak rate: $HALF XADD/s open loop, $SUBS subscribers" \
    "XADD reply"
R99=$(jqf '.delivery_latency.p99_us / 1000' redis_at_arq)
printf 'Delivery p99 at %s/s: ARQ %.2f ms, Redis %.2f ms; ARQ/Redis %.2f (below 1: ARQ lower)\n' \
    "$HALF" "$D99" "$R99" "$(awk -v a="$D99" -v r="$R99" 'BEGIN { print (r > 0 ? a / r : 0) }')"
echo
echo "arqd group commit per run (from /metrics; msgs/commit, mean commit ms, arqd CPU, stalls):"
for n in $(for r in $(seq "$ROUNDS"); do echo "arq_w1.$r arq_w16.$r"; done) arq_peak_s arq_half arq_half0; do
    printf '  %-9s %7.1f msgs/commit  %6.3f ms/commit  %4.0f%% CPU (arq-bench %.0f%%)  %s stalls, %s ms\n' \
        "$n" "$(jqf '.wal.msgs_per_commit // 0' "$n")" "$(jqf '.wal.mean_commit_ms // 0' "$n")" \
        "$(jqf '(.server_cpu // 0) * 100' "$n")" "$(jqf '.bench_cpu * 100' "$n")" \
        "$(jqf '.stalls.count // "?"' "$n")" "$(jqf '.stalls.ms // "?"' "$n")"
done
disk_check after

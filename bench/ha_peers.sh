#!/usr/bin/env bash
# bench/ha_peers.sh - replicated acknowledgements: the high-availability peers
# of bench/peers.sh. A publish counts once more than one machine has it:
#   - NATS JetStream, a 3-node cluster on loopback and an R3 file-storage
#     stream (arq-nats-bench --replicas 3, connections round-robin over the
#     three nodes): the PubAck comes after the stream's raft group has
#     committed the entry on a quorum (2 of 3). Debian's 2.9.10 does not fsync
#     before it acks (timer, as single-node: docs/benchmarks.md "NATS
#     JetStream"), so the quorum holds it in memory. A quorum check, after the
#     rows, SIGSTOPs nodes to show it: with both followers stopped no PubAck
#     comes, with one stopped it does;
#   - Redis 7 Streams, a primary and 2 replicas (replicaof), appendonly yes and
#     appendfsync always on all three: XADD then WAIT 1 pipelined on the same
#     connection (arq-redis-bench --wait 1), a publish counted only when WAIT
#     says >= 1 replica has it (fewer: wait_short). Redis 7.0's WAIT counts
#     replicas that received the entry, not that fsynced it (WAITAOF is 7.2).
# each at CONNS x 1 and CONNS x 16 in flight, 128-byte payloads; publishes/s
# and ack p50/p99 in microseconds. ARQ's rows (arqd with wal.ack=local and
# wal.ack=replicated into a Galera cluster) run only with ARQ_HA=1: see
# arq_rows() below.
#
# Starts its own servers on free loopback ports with data directories under
# /var/tmp (not tmpfs, so fsync is real), stops exactly those processes (by
# PID) and removes the directory on exit and on Ctrl-C.
#
# Usage: bench/ha_peers.sh [BUILD_DIR]   (default: build; ~1 minute)
# Environment: SECONDS_PER_RUN (5), CONNS (50),
#              ROUNDS (1): every row is run ROUNDS times, NATS and Redis
#              alternating, each round printed,
#              OUT (BUILD_DIR/ha_peers.json): the JSON report,
#              KEEP=1 keeps the temporary directory (server logs, JSON),
#              ARQ_HA=1 adds ARQ's rows (needs scripts/galera).
set -euo pipefail

cd "$(dirname "$0")/.."
BUILD=${1:-build}
NATS_BENCH=$BUILD/bench/arq-nats-bench
REDIS_BENCH=$BUILD/bench/arq-redis-bench
ARQD=$BUILD/programs/arqd
ARQ_BENCH=$BUILD/bench/arq-bench
PYTHON=/usr/bin/python3
RUN_S=${SECONDS_PER_RUN:-5}
CONNS=${CONNS:-50}
ROUNDS=${ROUNDS:-1}
OUT=${OUT:-$BUILD/ha_peers.json}
for v in CONNS ROUNDS; do
    case ${!v} in '' | *[!0-9]* | 0)
        echo "ha_peers.sh: $v must be a positive integer" >&2
        exit 2
        ;;
    esac
done
START_NS=$(date +%s%N)

for tool in "$NATS_BENCH" "$REDIS_BENCH"; do
    [ -x "$tool" ] || {
        echo "ha_peers.sh: $tool not built (ninja -C $BUILD)" >&2
        exit 2
    }
done
for tool in nats-server redis-server redis-cli jq; do
    command -v "$tool" >/dev/null || {
        echo "ha_peers.sh: $tool not found" >&2
        exit 2
    }
done

TMP=$(mktemp -d /var/tmp/arq-ha-peers.XXXXXX)
NATS_PIDS=()
REDIS_PIDS=()
ARQD_PID=
GALERA_DIR=

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    local pids=("${NATS_PIDS[@]}" "${REDIS_PIDS[@]}")
    [ -z "$ARQD_PID" ] || pids+=("$ARQD_PID")
    for pid in "${pids[@]}"; do
        # a node the quorum check left stopped would not act on SIGTERM
        kill -CONT "$pid" 2>/dev/null || true
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [ -n "$GALERA_DIR" ]; then
        scripts/galera stop "$GALERA_DIR" >/dev/null 2>&1 || echo "ha_peers.sh: galera stop failed" >&2
    fi
    if [ "${KEEP:-0}" = 1 ]; then
        echo "ha_peers.sh: kept $TMP" >&2
    else
        rm -rf "$TMP"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
    "$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

load() { cut -d' ' -f1-3 /proc/loadavg; }

http_get() { # URL: the body, or nothing
    "$PYTHON" -c 'import sys, urllib.request
try: print(urllib.request.urlopen(sys.argv[1], timeout=2).read().decode())
except Exception: pass' "$1"
}

echo "ha_peers.sh: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), $(nproc) CPUs, $(uname -sr)"
echo "ha_peers.sh: data under $TMP ($(df --output=fstype "$TMP" | tail -1)), load $(load)"
echo "ha_peers.sh: $(nats-server --version), $(redis-server --version | cut -d' ' -f1-3)"

# ---- NATS: 3 JetStream nodes ---------------------------------------------------
NATS_URLS=()
NATS_MON=()
NATS_NAMES=(n1 n2 n3)
declare -a CPORT
for i in 0 1 2; do CPORT[i]=$(free_port); done
for i in 0 1 2; do
    name=${NATS_NAMES[i]}
    port=$(free_port)
    mon=$(free_port)
    mkdir -p "$TMP/nats/$name"
    routes=
    for j in 0 1 2; do
        [ "$j" = "$i" ] || routes="$routes nats-route://127.0.0.1:${CPORT[j]}"
    done
    cat >"$TMP/nats/$name.conf" <<EOF
server_name: $name
listen: 127.0.0.1:$port
http: 127.0.0.1:$mon
jetstream {
  store_dir: "$TMP/nats/$name"
}
cluster {
  name: arqha
  listen: 127.0.0.1:${CPORT[i]}
  routes: [$(echo "$routes" | sed 's/^ //; s/ /, /g')]
}
EOF
    nats-server -c "$TMP/nats/$name.conf" >"$TMP/nats/$name.log" 2>&1 &
    NATS_PIDS+=($!)
    NATS_URLS+=("nats://127.0.0.1:$port")
    NATS_MON+=("http://127.0.0.1:$mon")
done
# Ready when every node reports the same JetStream meta leader (before that a
# stream creation has no one to answer it).
nats_ready=
for _ in $(seq 300); do
    leaders=
    for m in "${NATS_MON[@]}"; do
        leaders="$leaders $(http_get "$m/jsz" | jq -r '.meta_cluster.leader // empty' 2>/dev/null)"
    done
    # shellcheck disable=SC2086 # one word per node
    set -- $leaders
    if [ $# = 3 ] && [ "$1" = "$2" ] && [ "$2" = "$3" ]; then
        nats_ready=$1
        break
    fi
    for pid in "${NATS_PIDS[@]}"; do
        kill -0 "$pid" 2>/dev/null || break 2
    done
    sleep 0.1
done
if [ -z "$nats_ready" ]; then
    echo "ha_peers.sh: the NATS cluster did not form:" >&2
    tail -5 "$TMP"/nats/*.log >&2
    exit 1
fi
echo "ha_peers.sh: nats-server cluster pids ${NATS_PIDS[*]} at ${NATS_URLS[*]}, JetStream meta leader $nats_ready"

# ---- Redis: a primary and 2 replicas ---------------------------------------------
REDIS_PORTS=()
for i in 0 1 2; do
    REDIS_PORTS+=("$(free_port)")
    mkdir -p "$TMP/redis/$i"
    extra=()
    [ "$i" = 0 ] || extra=(--replicaof 127.0.0.1 "${REDIS_PORTS[0]}")
    redis-server --bind 127.0.0.1 --port "${REDIS_PORTS[i]}" --appendonly yes --appendfsync always \
        --save '' --dir "$TMP/redis/$i" --daemonize no --protected-mode yes "${extra[@]}" \
        >"$TMP/redis/$i.log" 2>&1 &
    REDIS_PIDS+=($!)
done
# Ready when the primary has both replicas online (past their initial sync)
# and each replica's link is up: before that WAIT 1 would time out.
redis_ready=
for _ in $(seq 300); do
    online=$(redis-cli -p "${REDIS_PORTS[0]}" info replication 2>/dev/null | grep -c 'state=online' || true)
    up=0
    for i in 1 2; do
        redis-cli -p "${REDIS_PORTS[i]}" info replication 2>/dev/null | grep -q 'master_link_status:up' &&
            up=$((up + 1))
    done
    if [ "$online" = 2 ] && [ "$up" = 2 ]; then
        redis_ready=1
        break
    fi
    for pid in "${REDIS_PIDS[@]}"; do
        kill -0 "$pid" 2>/dev/null || break 2
    done
    sleep 0.1
done
if [ -z "$redis_ready" ]; then
    echo "ha_peers.sh: the Redis replicas did not come online:" >&2
    tail -5 "$TMP"/redis/*.log >&2
    exit 1
fi
for i in 0 1 2; do
    [ "$(redis-cli -p "${REDIS_PORTS[i]}" config get appendfsync | tail -1)" = always ] || {
        echo "ha_peers.sh: redis on ${REDIS_PORTS[i]} is not appendfsync always" >&2
        exit 1
    }
done
# AOF rewrites fork and stall Redis for tens of ms; off, so the peer is at its best
for p in "${REDIS_PORTS[@]}"; do
    redis-cli -p "$p" config set auto-aof-rewrite-percentage 0 >/dev/null
done
echo "ha_peers.sh: redis-server pids ${REDIS_PIDS[*]}: primary 127.0.0.1:${REDIS_PORTS[0]}," \
    "replicas ${REDIS_PORTS[1]} ${REDIS_PORTS[2]} (appendonly yes, appendfsync always on all three)"

# ---- runs ----------------------------------------------------------------------
nats_run() { # NAME DEPTH
    local urls=() u
    for u in "${NATS_URLS[@]}"; do urls+=(--url "$u"); done
    echo
    echo "== arq-nats-bench --replicas 3 -c $CONNS -w $2, 3 servers (load $(load))"
    "$NATS_BENCH" "${urls[@]}" --replicas 3 -c "$CONNS" -w "$2" --seconds "$RUN_S" --json \
        >"$TMP/$1.json"
}
redis_run() { # NAME DEPTH
    echo
    echo "== arq-redis-bench --wait 1 -c $CONNS -w $2 (load $(load))"
    "$REDIS_BENCH" --url "redis://127.0.0.1:${REDIS_PORTS[0]}" --wait 1 --wait-timeout 1000 \
        -c "$CONNS" -w "$2" --seconds "$RUN_S" --server-pid "${REDIS_PIDS[0]}" --json \
        >"$TMP/$1.json"
}
for r in $(seq "$ROUNDS"); do
    [ "$ROUNDS" -gt 1 ] && echo && echo "==== round $r of $ROUNDS"
    for depth in 1 16; do
        nats_run "nats_w$depth.$r" "$depth" >&2
        redis_run "redis_w$depth.$r" "$depth" >&2
    done
done

# ---- NATS quorum check -------------------------------------------------------------
# The PubAck of an R3 stream must wait for a quorum: SIGSTOP both followers of
# the stream's leader and publish (no ack may come), SIGCONT them (the ack
# comes), then stop one follower (2 of 3 remain: the ack comes).
NATS_NAME_PIDS=
for i in 0 1 2; do NATS_NAME_PIDS="$NATS_NAME_PIDS ${NATS_NAMES[i]}=${NATS_PIDS[i]}=${NATS_URLS[i]}"; done
echo
echo "== NATS quorum check (SIGSTOP of the stream's followers)"
"$PYTHON" - "$NATS_NAME_PIDS" >"$TMP/quorum.json" <<'PY'
import json, os, signal, socket, sys, time

# name=pid=nats://host:port per node
nodes = {n: (int(pid), url) for n, pid, url in (t.split("=") for t in sys.argv[1].split())}
pids = {n: pid for n, (pid, _) in nodes.items()}


class Nats:
    def __init__(self, url):
        host, port = url.split("//")[1].split(":")
        self.s = socket.create_connection((host, int(port)), timeout=5)
        self.buf = b""
        self.s.sendall(b'CONNECT {"verbose":false,"headers":false,"protocol":1}\r\n'
                       b"SUB _INBOX.q.* 1\r\nPING\r\n")
        self.msg(lambda subj: False, 5, want_pong=True)

    def msg(self, match, timeout, want_pong=False):
        """The payload of the first MSG whose subject matches, or None after timeout."""
        end = time.monotonic() + timeout
        while True:
            while b"\r\n" in self.buf:
                line, rest = self.buf.split(b"\r\n", 1)
                if line.startswith(b"MSG "):
                    f = line.split()
                    n = int(f[-1])
                    if len(rest) < n + 2:
                        break
                    self.buf = rest[n + 2:]
                    if match(f[1].decode()):
                        return rest[:n].decode()
                    continue
                self.buf = rest
                if line == b"PING":
                    self.s.sendall(b"PONG\r\n")
                elif line == b"PONG" and want_pong:
                    return ""
            left = end - time.monotonic()
            if left <= 0:
                return None
            self.s.settimeout(left)
            try:
                d = self.s.recv(65536)
            except socket.timeout:
                return None
            if not d:
                raise OSError("connection closed")
            self.buf += d

    def request(self, subj, tag, body, timeout):
        t = time.monotonic()
        self.s.sendall(b"PUB %s _INBOX.q.%s %d\r\n%s\r\n" % (subj.encode(), tag.encode(),
                                                             len(body), body))
        return self.msg(lambda s: s == "_INBOX.q." + tag, timeout), time.monotonic() - t


out = {}
c = Nats(next(iter(nodes.values()))[1])
info, _ = c.request("$JS.API.STREAM.INFO.ARQBENCH", "info", b"", 5)
cl = json.loads(info or "{}").get("cluster", {})
leader = cl.get("leader")
followers = [r["name"] for r in cl.get("replicas", [])]
out["leader"], out["followers"] = leader, followers
if leader is None or len(followers) != 2 or any(n not in pids for n in [leader] + followers):
    out["ok"] = False
    out["error"] = f"stream ARQBENCH: leader {leader}, followers {followers}"
else:
    # publish through the leader's own server, so that stopping the followers
    # cannot also stop the client's connection
    c = Nats(nodes[leader][1])
    out["client_on"] = leader
    stopped = []
    try:
        for f in followers:
            os.kill(pids[f], signal.SIGSTOP)
            stopped.append(f)
        ack, _ = c.request("arqbench.0", "p1", b"quorum check", 2)
        out["ack_with_both_followers_stopped"] = ack is not None
        for f in followers:
            os.kill(pids[f], signal.SIGCONT)
        stopped = []
        t = time.monotonic()
        late = c.msg(lambda s: s == "_INBOX.q.p1", 10) if ack is None else ack
        out["ack_after_sigcont"] = late is not None and '"seq"' in late
        out["ack_after_sigcont_s"] = round(time.monotonic() - t, 3)
        os.kill(pids[followers[0]], signal.SIGSTOP)
        stopped = [followers[0]]
        ack, dt = c.request("arqbench.0", "p2", b"quorum check", 5)
        out["ack_with_one_follower_stopped"] = ack is not None and '"seq"' in ack
        out["ack_with_one_follower_stopped_ms"] = round(dt * 1e3, 2)
    finally:
        for f in stopped:
            os.kill(pids[f], signal.SIGCONT)
    out["ok"] = (not out["ack_with_both_followers_stopped"] and out["ack_after_sigcont"]
                 and out["ack_with_one_follower_stopped"])
print(json.dumps(out))
PY
jq -r 'if .error then "   CHECK FAILED: \(.error)" else
    "   stream leader \(.leader), followers \(.followers | join(" ")), client on \(.client_on):\n" +
    "   both followers stopped: PubAck within 2 s: \(.ack_with_both_followers_stopped);" +
    " after SIGCONT: \(.ack_after_sigcont) (\(.ack_after_sigcont_s) s)\n" +
    "   one follower stopped: PubAck: \(.ack_with_one_follower_stopped)" +
    " (\(.ack_with_one_follower_stopped_ms) ms) -> \(if .ok then "ok: the PubAck waits for a quorum" else "CHECK FAILED" end)" end' \
    "$TMP/quorum.json" >&2

# ==== ARQ rows (hook) ===============================================================
# arq_rows: ARQ's own rows, only with ARQ_HA=1. Each of the two runs gets a
# fresh arqd (data under $TMP, --anonymous, a free port as peers.sh starts it)
# syncing into node 1 of a Galera cluster from scripts/galera (another branch:
# `scripts/galera start DIR` prints DATABASE_URL_1=mysql://... lines and writes
# DIR/urls; `scripts/galera stop DIR`):
#   wal.ack=local       a puback after the local journal fsync (as peers.sh)
#   wal.ack=replicated  a puback once the Galera cluster has the batch
# and arq-bench at CONNS x 1 and CONNS x 16. Without scripts/galera, or
# without ARQ_HA=1, the ARQ rows are skipped with a message (and in the JSON).
ARQ_SKIPPED=
arq_start() { # NAME ACK: arqd with --set wal.ack=ACK; sets ARQD_PID, ARQ_URL
    mkdir -p "$TMP/$1"
    # a database of its own: MySQL's watermark belongs to one WAL
    local db=arq_$2
    mariadb --no-defaults --socket="$GALERA_DIR/node1/mariadbd.sock" -uroot -e \
        "CREATE DATABASE IF NOT EXISTS $db; GRANT ALL ON $db.* TO 'arq'@'127.0.0.1'"
    DATABASE_URL=${GALERA_URL%/*}/$db "$ARQD" --port 0 --data-dir "$TMP/$1" --anonymous \
        --set "wal.ack=$2" >"$TMP/$1.out" 2>"$TMP/$1.err" &
    ARQD_PID=$!
    ARQ_URL=
    for _ in $(seq 100); do
        ARQ_URL=$(sed -n '1s|^arqd listening on \(ws://[^ ]*\).*|\1|p' "$TMP/$1.out")
        [ -n "$ARQ_URL" ] && break
        kill -0 "$ARQD_PID" 2>/dev/null || break
        sleep 0.1
    done
    if [ -z "$ARQ_URL" ]; then
        echo "ha_peers.sh: arqd (wal.ack=$2) did not start:" >&2
        cat "$TMP/$1.err" >&2
        return 1
    fi
    # the drain connected and migrated: replicated publishes are taken
    local h=${ARQ_URL#ws://}
    h=${h%/ws}
    for _ in $(seq 300); do
        "$PYTHON" -c 'import json, sys, urllib.request as u
sys.exit(json.load(u.urlopen(sys.argv[1], timeout=2))["sync"]["state"] != "ok")' \
            "http://$h/health" 2>/dev/null && break
        sleep 0.1
    done
    echo "ha_peers.sh: arqd pid $ARQD_PID at $ARQ_URL (wal.ack=$2, DATABASE_URL ${GALERA_URL##*@})" >&2
}
arq_stop() {
    kill "$ARQD_PID" 2>/dev/null || true
    wait "$ARQD_PID" 2>/dev/null || true
    ARQD_PID=
}
arq_rows() {
    if [ "${ARQ_HA:-0}" != 1 ]; then
        ARQ_SKIPPED="ARQ_HA=1 not set"
        return 0
    fi
    if [ ! -x scripts/galera ]; then
        ARQ_SKIPPED="scripts/galera not found"
        echo "ha_peers.sh: ARQ_HA=1 but no scripts/galera: ARQ rows skipped" >&2
        return 0
    fi
    local ack depth
    for tool in "$ARQD" "$ARQ_BENCH"; do
        [ -x "$tool" ] || {
            ARQ_SKIPPED="$tool not built"
            echo "ha_peers.sh: $tool not built: ARQ rows skipped" >&2
            return 0
        }
    done
    GALERA_DIR=$TMP/galera
    scripts/galera start "$GALERA_DIR" >"$TMP/galera.out" 2>"$TMP/galera.err" || {
        ARQ_SKIPPED="scripts/galera start failed"
        echo "ha_peers.sh: scripts/galera start failed: ARQ rows skipped" >&2
        cat "$TMP/galera.err" >&2
        return 0
    }
    GALERA_URL=$(sed -n 's/^DATABASE_URL_1=//p' "$TMP/galera.out" | head -1)
    [ -n "$GALERA_URL" ] || GALERA_URL=$(head -1 "$GALERA_DIR/urls" 2>/dev/null | sed 's/^DATABASE_URL_1=//')
    if [ -z "$GALERA_URL" ]; then
        ARQ_SKIPPED="no DATABASE_URL_1 from scripts/galera"
        echo "ha_peers.sh: scripts/galera printed no DATABASE_URL_1: ARQ rows skipped" >&2
        return 0
    fi
    for ack in local replicated; do
        arq_start "arqd_$ack" "$ack" || {
            ARQ_SKIPPED="arqd with wal.ack=$ack did not start"
            return 0
        }
        for depth in 1 16; do
            echo >&2
            echo "== arq-bench -c $CONNS -w $depth, wal.ack=$ack (load $(load))" >&2
            "$ARQ_BENCH" --url "$ARQ_URL" --seconds "$RUN_S" --server-pid "$ARQD_PID" --json \
                -c "$CONNS" -w "$depth" >"$TMP/arq_${ack}_w$depth.json"
        done
        arq_stop
    done
}
arq_rows
# ==== end of the ARQ rows ============================================================

# ---- summary and JSON ----------------------------------------------------------------
jqf() { jq -r "$1" "$TMP/$2.json"; }
echo
echo "Replicated acknowledgements, 128-byte messages, $CONNS connections, ${RUN_S} s windows" \
    "(load now $(load)):"
echo
printf '| %-32s | %-10s | %12s | %10s | %10s | %9s |\n' \
    "peer" "c x w" "publishes/s" "ack p50 us" "ack p99 us" "not acked"
printf '|%s|%s|%s:|%s:|%s:|%s:|\n' "----------------------------------" "------------" \
    "-------------" "-----------" "-----------" "----------"
ROWS=()
row() { # PEER NAME DEPTH ROUND LATENCY_KEY NOT_ACKED_EXPR
    local f=$TMP/$2.json
    printf '| %-32s | %-10s | %12.0f | %10.0f | %10.0f | %9s |\n' "$1" "$CONNS x $3${4:+, $4}" \
        "$(jq .publishes_per_s "$f")" "$(jq ".$5.p50_us" "$f")" "$(jq ".$5.p99_us" "$f")" \
        "$(jq -r "$6" "$f")"
    ROWS+=("$(jq -c --arg peer "$1" --argjson depth "$3" --argjson round "${4:-1}" \
        "{peer: \$peer, conns: .config.conns, depth: \$depth, round: \$round,
          publishes_per_s, p50_us: .$5.p50_us, p99_us: .$5.p99_us, p999_us: .$5.p999_us,
          not_acked: ($6), errors: (.errors // 0), raw: .}" "$f")")
}
for depth in 1 16; do
    for r in $(seq "$ROUNDS"); do
        rl=
        [ "$ROUNDS" -gt 1 ] && rl=$r
        row "NATS JetStream R3 (3 nodes)" "nats_w$depth.$r" "$depth" "$rl" ack_latency .errors
    done
done
for depth in 1 16; do
    for r in $(seq "$ROUNDS"); do
        rl=
        [ "$ROUNDS" -gt 1 ] && rl=$r
        row "Redis XADD+WAIT 1 (1+2 replicas)" "redis_w$depth.$r" "$depth" "$rl" puback_latency \
            '.wait_short + .errors'
    done
done
if [ -z "$ARQ_SKIPPED" ]; then
    for ack in local replicated; do
        for depth in 1 16; do
            row "ARQ wal.ack=$ack" "arq_${ack}_w$depth" "$depth" "" puback_latency '.errors // 0'
        done
    done
fi
echo
echo "(publishes/s: acknowledgements in the window / window, after 1 s warm-up; -w = publishes"
echo " in flight per connection. NATS: PubAck of an R3 file-storage stream, connections round-robin"
echo " over the 3 nodes, acked once 2 of 3 hold it, none fsynced (2.9.10: timer). Redis: the WAIT 1"
echo " reply after XADD, one replica has it; \"not acked\": WAIT returned 0 replicas (timeout) or an"
echo " error. Redis's WAIT blocks its connection, so -w 16 there is 16 queued, one replicated at a time.)"
[ -n "$ARQ_SKIPPED" ] && echo "ARQ rows skipped: $ARQ_SKIPPED."
printf 'NATS quorum check: %s\n' "$(jq -r 'if .ok then "ok (no PubAck while both followers were stopped)" else "FAILED" end' "$TMP/quorum.json")"

ELAPSED=$(awk -v a="$START_NS" -v b="$(date +%s%N)" 'BEGIN { printf "%.1f", (b - a) / 1e9 }')
printf '%s\n' "${ROWS[@]}" | jq -s \
    --arg date "$(date -u '+%Y-%m-%dT%H:%M:%SZ')" --argjson seconds "$RUN_S" \
    --argjson conns "$CONNS" --argjson rounds "$ROUNDS" --argjson elapsed "$ELAPSED" \
    --arg nats "$(nats-server --version)" --arg redis "$(redis-server --version | cut -d' ' -f3)" \
    --arg arq_skipped "$ARQ_SKIPPED" --slurpfile quorum "$TMP/quorum.json" \
    '{tool: "ha_peers.sh", date: $date, seconds_per_run: $seconds, conns: $conns,
      rounds: $rounds, elapsed_s: $elapsed, versions: {nats: $nats, redis: $redis},
      nats: {replicas: 3, nodes: 3, rows: [.[] | select(.peer | startswith("NATS"))],
             quorum_check: $quorum[0]},
      redis: {wait: 1, replicas: 2, rows: [.[] | select(.peer | startswith("Redis"))]},
      arq: (if $arq_skipped == "" then {rows: [.[] | select(.peer | startswith("ARQ"))]}
            else {skipped: $arq_skipped} end)}' >"$OUT"
echo "ha_peers.sh: JSON in $OUT; took $ELAPSED s"

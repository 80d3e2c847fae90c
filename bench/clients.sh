#!/usr/bin/env bash
# bench/clients.sh - the JS and Python clients against libarq (issue #19):
# publish and delivery rates and reconnect-to-resumed times of each library,
# used as an application uses it, against one arqd, in one run. See
# docs/benchmarks.md ("Client libraries: JS and Python against libarq").
#
# The drivers, one per library, take the same options and print one JSON line
# each: bench/clients/bench_libarq.c (arq-client-bench, built by meson),
# bench/clients/bench_js.mjs (node, clients/js/dist) and
# bench/clients/bench_py.py (/usr/bin/python3, clients/python). Each mode is
# run for the three libraries back to back, the order rotating from one
# repetition to the next, and every figure is the median over the
# repetitions: this VM pauses for 10-18 ms now and then, and a single run
# can land on a pause.
#
# Starts its own arqd (a free 127.0.0.1 port, WAL-only, data under /var/tmp:
# not tmpfs, so fsync is real) and the cut proxy (bench/clients/cut_proxy.py,
# loopback) the reconnect mode runs through; stops exactly those two by PID
# and removes the directory on exit and on Ctrl-C.
#
# Usage: bench/clients.sh [BUILD_DIR]          (default: build; 1-2 minutes)
# Environment: REPS (5) repetitions; COUNT (50000) messages per publish and
#              delivery run; SIZE (100) payload bytes; CUTS (20) connection
#              cuts per reconnect run; WINDOW (10000) publishes waiting for
#              a puback at most (the libraries' max_pending); WARMUP (1000)
#              untimed messages first; CLIENTS ("libarq js python": libarq
#              must be one, the ratios are against it); DRIVER_TIMEOUT (120 s
#              per driver run); KEEP=1 keeps the temporary directory (arqd's
#              log, every run's JSON in runs.jsonl).
set -euo pipefail

cd "$(dirname "$0")/.."
BUILD=${1:-build}
ARQD=$BUILD/programs/arqd
CBENCH=$BUILD/bench/arq-client-bench
PYTHON=/usr/bin/python3 # Debian's, with python3-websockets and python3-msgpack
NODE=${NODE:-node}
REPS=${REPS:-5}
COUNT=${COUNT:-50000}
SIZE=${SIZE:-100}
CUTS=${CUTS:-20}
WINDOW=${WINDOW:-10000}
WARMUP=${WARMUP:-1000}
CLIENTS=${CLIENTS:-libarq js python}
DRIVER_TIMEOUT=${DRIVER_TIMEOUT:-120}

die() {
    echo "clients.sh: $*" >&2
    exit 2
}
for v in REPS COUNT CUTS WINDOW DRIVER_TIMEOUT; do
    case ${!v} in '' | *[!0-9]* | 0) die "$v must be a positive integer" ;; esac
done
for v in SIZE WARMUP; do
    case ${!v} in '' | *[!0-9]*) die "$v must be an integer >= 0" ;; esac
done
read -r -a CLIENT_LIST <<<"$CLIENTS"
case " $CLIENTS " in *" libarq "*) ;; *) die "CLIENTS must include libarq (the ratios are against it)" ;; esac
for c in "${CLIENT_LIST[@]}"; do
    case $c in
    libarq) [ -x "$CBENCH" ] || die "$CBENCH not built (ninja -C $BUILD)" ;;
    js)
        command -v "$NODE" >/dev/null || die "node not found (CLIENTS=\"libarq python\" leaves JS out)"
        [ -f clients/js/dist/index.js ] || die "clients/js/dist not built (ninja -C $BUILD builds it" \
            "once clients/js/node_modules is there: scripts/dev test installs it)"
        ;;
    python)
        "$PYTHON" -c 'import websockets, msgpack' 2>/dev/null ||
            die "$PYTHON lacks websockets or msgpack (apt-get install python3-websockets python3-msgpack)"
        ;;
    *) die "unknown client '$c' in CLIENTS (libarq, js, python)" ;;
    esac
done
[ -x "$ARQD" ] || die "$ARQD not built (ninja -C $BUILD)"
command -v jq >/dev/null || die "jq not found"

TMP=$(mktemp -d /var/tmp/arq-clients.XXXXXX)
ARQD_PID=
PROXY_PID=

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    for pid in $PROXY_PID $ARQD_PID; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in $PROXY_PID $ARQD_PID; do
        wait "$pid" 2>/dev/null || true
    done
    if [ "${KEEP:-0}" = 1 ]; then
        echo "clients.sh: kept $TMP" >&2
    else
        rm -rf "$TMP"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

load() { cut -d' ' -f1-3 /proc/loadavg; }

echo "clients.sh: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), $(nproc) CPUs, $(uname -sr), load $(load)"
echo "clients.sh: data under $TMP ($(df --output=fstype "$TMP" | tail -1))"
for c in "${CLIENT_LIST[@]}"; do
    case $c in
    js) echo "clients.sh: js: node $("$NODE" --version), ws $("$NODE" -p 'require("./clients/js/node_modules/ws/package.json").version' 2>/dev/null || echo '?'), @msgpack/msgpack $("$NODE" -p 'require("./clients/js/node_modules/@msgpack/msgpack/package.json").version' 2>/dev/null || echo '?')" ;;
    python) echo "clients.sh: python: $("$PYTHON" -c 'import sys, websockets, msgpack; print("Python", sys.version.split()[0] + ", websockets", websockets.__version__ + ", msgpack", ".".join(map(str, msgpack.version)), "(C extension)" if msgpack.Packer.__module__.endswith("_cmsgpack") else "(pure Python)")')" ;;
    esac
done
echo "clients.sh: $REPS repetitions; $COUNT messages of $SIZE bytes per publish/delivery run" \
    "(window $WINDOW, warm-up $WARMUP); $CUTS cuts per reconnect run"

# ---- arqd and the cut proxy ---------------------------------------------------
mkdir "$TMP/arq"
"$ARQD" --anonymous --port 0 --data-dir "$TMP/arq" >"$TMP/arqd.out" 2>"$TMP/arqd.err" &
ARQD_PID=$!
ARQ_URL=
for _ in $(seq 100); do
    ARQ_URL=$(sed -n '1s|^arqd listening on \(ws://[^ ]*\).*|\1|p' "$TMP/arqd.out")
    [ -n "$ARQ_URL" ] && break
    kill -0 "$ARQD_PID" 2>/dev/null || break
    sleep 0.1
done
if [ -z "$ARQ_URL" ]; then
    echo "clients.sh: arqd did not start:" >&2
    cat "$TMP/arqd.err" >&2
    exit 1
fi
ARQ_PORT=${ARQ_URL#ws://127.0.0.1:}
ARQ_PORT=${ARQ_PORT%%/*}
"$PYTHON" bench/clients/cut_proxy.py "$ARQ_PORT" >"$TMP/proxy.out" 2>"$TMP/proxy.err" &
PROXY_PID=$!
PROXY_LINE=
for _ in $(seq 100); do
    PROXY_LINE=$(head -1 "$TMP/proxy.out")
    [ -n "$PROXY_LINE" ] && break
    kill -0 "$PROXY_PID" 2>/dev/null || break
    sleep 0.1
done
read -r _ _ PROXY_DATA _ PROXY_CONTROL <<<"$PROXY_LINE" || true
if [ -z "${PROXY_CONTROL:-}" ]; then
    echo "clients.sh: the cut proxy did not start:" >&2
    cat "$TMP/proxy.err" >&2
    exit 1
fi
echo "clients.sh: arqd pid $ARQD_PID at $ARQ_URL; cut proxy pid $PROXY_PID at $PROXY_DATA" \
    "(control $PROXY_CONTROL)"

# run_driver CLIENT MODE REP: one driver run; its JSON line, with rep, goes to runs.jsonl
run_driver() {
    local client=$1 mode=$2 rep=$3 url=$ARQ_URL
    local -a cmd extra=()
    case $client in
    libarq) cmd=("$CBENCH") ;;
    js) cmd=("$NODE" bench/clients/bench_js.mjs) ;;
    python) cmd=("$PYTHON" bench/clients/bench_py.py) ;;
    esac
    if [ "$mode" = reconnect ]; then
        url=ws://$PROXY_DATA/ws
        extra=(--control "$PROXY_CONTROL")
    fi
    local name=$mode.$client.$rep
    if ! timeout $((DRIVER_TIMEOUT + 10)) "${cmd[@]}" --url "$url" --prefix "cb.$rep.$client.$mode" \
        --mode "$mode" --count "$COUNT" --size "$SIZE" --window "$WINDOW" --warmup "$WARMUP" \
        --cuts "$CUTS" --server-pid "$ARQD_PID" --timeout "$DRIVER_TIMEOUT" "${extra[@]}" \
        >"$TMP/$name.json" 2>"$TMP/$name.err"; then
        echo "clients.sh: $client $mode (repetition $rep) failed:" >&2
        cat "$TMP/$name.err" >&2
        exit 1
    fi
    jq -c --argjson rep "$rep" '. + {rep: $rep}' "$TMP/$name.json" >>"$TMP/runs.jsonl"
    jq -r --arg c "$client" --arg r "$rep" \
        'if .mode == "reconnect"
         then "  \($r) \(.mode) \($c): median \(.median_ms) ms, p90 \(.p90_ms) ms"
         else "  \($r) \(.mode) \($c): \(.msgs_per_s | floor) msgs/s, client CPU \(.cpu_us_per_msg) us/msg, arqd \(.server_cpu)"
         end' "$TMP/$name.json" >&2
}

n=${#CLIENT_LIST[@]}
for rep in $(seq "$REPS"); do
    # rotate the order: repetition r starts with client (r - 1) mod n
    order=()
    for i in $(seq 0 $((n - 1))); do
        order+=("${CLIENT_LIST[$(((rep - 1 + i) % n))]}")
    done
    echo "clients.sh: repetition $rep of $REPS (${order[*]}), load $(load)" >&2
    for mode in publish delivery reconnect; do
        for client in "${order[@]}"; do
            run_driver "$client" "$mode" "$rep"
        done
    done
done

# ---- summary -------------------------------------------------------------------
# Medians over the repetitions, per client and mode; ratios are the client's
# median over libarq's median (rates: above 1 is faster than libarq; times:
# above 1 is slower). "paired" is the median over the repetitions of the
# same ratio taken within each repetition, with its range.
SUMMARY=$(jq -s --arg clients "$CLIENTS" '
  def median: sort | if length == 0 then null
    elif length % 2 == 1 then .[(length - 1) / 2] else (.[length / 2 - 1] + .[length / 2]) / 2 end;
  def metric: if .mode == "reconnect" then .median_ms else .msgs_per_s end;
  . as $runs
  | ($clients | split(" ") | map(select(. != ""))) as $cl
  | [ "publish", "delivery", "reconnect" ] as $modes
  | reduce $cl[] as $c ({}; .[$c] = (reduce $modes[] as $m ({};
      ([ $runs[] | select(.client == $c and .mode == $m) ]) as $r
      | .[$m] = {
          value: ([ $r[] | metric ] | median),
          p90_ms: ([ $r[] | .p90_ms // empty ] | median),
          cpu_us_per_msg: ([ $r[] | .cpu_us_per_msg // empty ] | median),
          server_cpu: ([ $r[] | .server_cpu // empty ] | median),
          detect_ms: ([ $r[] | .detect_ms // empty ] | median),
          backoff_ms: ([ $r[] | .backoff_ms // empty ] | median),
          handshake_ms: ([ $r[] | .handshake_ms // empty ] | median),
          paired: ([ $r[] | . as $x | ($runs[] | select(.client == "libarq" and .mode == $m
                     and .rep == $x.rep) | metric) as $l | ($x | metric) / $l ] | sort)
        })))
  ' "$TMP/runs.jsonl")
echo "$SUMMARY" >"$TMP/summary.json"

sj() { jq -r "$1" <<<"$SUMMARY"; }
# sep W...: a markdown separator row for columns of printf widths W (a
# trailing r: right-aligned)
sep() {
    local w
    for w in "$@"; do
        local n=${w%r} d
        d=$(printf '%*s' $((n + 2)) '' | tr ' ' -)
        [ "$w" != "$n" ] && d=${d%?}:
        printf '|%s' "$d"
    done
    echo '|'
}
ratio() { # CLIENT MODE: median / libarq median, and the paired median and range
    jq -r --arg c "$1" --arg m "$2" '
      def median: if length == 0 then null elif length % 2 == 1 then .[(length - 1) / 2]
        else (.[length / 2 - 1] + .[length / 2]) / 2 end;
      (.[$c][$m].value / .libarq[$m].value) as $r | .[$c][$m].paired as $p
      | "\($r * 100 | round / 100) (\($p | median * 100 | round / 100); \($p[0] * 100 | round / 100)-\($p[-1] * 100 | round / 100))"' \
        <<<"$SUMMARY"
}

echo
echo "Client libraries against one arqd: $SIZE-byte messages, medians over $REPS repetitions (load now $(load))"
echo
printf '| %-7s | %12s | %-22s | %12s | %-22s | %9s | %7s | %-22s |\n' client "publish/s" "x libarq (paired)" \
    "delivery/s" "x libarq (paired)" "resume ms" "p90 ms" "x libarq (paired)"
sep 7 12r 22 12r 22 9r 7r 22
for c in "${CLIENT_LIST[@]}"; do
    printf '| %-7s | %12.0f | %-22s | %12.0f | %-22s | %9.2f | %7.2f | %-22s |\n' "$c" \
        "$(sj ".\"$c\".publish.value")" "$(ratio "$c" publish)" \
        "$(sj ".\"$c\".delivery.value")" "$(ratio "$c" delivery)" \
        "$(sj ".\"$c\".reconnect.value")" "$(sj ".\"$c\".reconnect.p90_ms")" "$(ratio "$c" reconnect)"
done
echo
echo "(publish/s: pubacks per second, $COUNT publishes with msgids, at most $WINDOW waiting; delivery/s:"
echo " messages per second to one subscriber from earliest, with the library's acking; resume ms:"
echo " from the proxy's cut to the library's \"connected\" state after the resumed welcome, the"
echo " median over the repetitions of each run's median (and p90) of $CUTS cuts. x libarq: the"
echo " ratio of the medians (rates: above 1 is faster than libarq; resume: above 1 is slower);"
echo " in brackets the median and range of the same ratio within each repetition.)"
echo
echo "CPU per message (medians): the client process over the timed part, and arqd's share of one core:"
echo
printf '| %-7s | %16s | %17s | %13s | %14s |\n' client "publish us/msg" "delivery us/msg" "arqd publish" "arqd delivery"
sep 7 16r 17r 13r 14r
for c in "${CLIENT_LIST[@]}"; do
    printf '| %-7s | %16.2f | %17.2f | %12.0f%% | %13.0f%% |\n' "$c" \
        "$(sj ".\"$c\".publish.cpu_us_per_msg")" "$(sj ".\"$c\".delivery.cpu_us_per_msg")" \
        "$(sj "(.\"$c\".publish.server_cpu // 0) * 100")" "$(sj "(.\"$c\".delivery.server_cpu // 0) * 100")"
done
echo
echo "Reconnect-to-resumed in parts (medians), split at the library's state events:"
echo
printf '| %-7s | %9s | %10s | %12s | %9s |\n' client "detect ms" "backoff ms" "handshake ms" "total ms"
sep 7 9r 10r 12r 9r
for c in "${CLIENT_LIST[@]}"; do
    printf '| %-7s | %9.2f | %10.2f | %12.2f | %9.2f |\n' "$c" "$(sj ".\"$c\".reconnect.detect_ms")" \
        "$(sj ".\"$c\".reconnect.backoff_ms")" "$(sj ".\"$c\".reconnect.handshake_ms")" \
        "$(sj ".\"$c\".reconnect.value")"
done
echo
echo "(detect: the cut to \"disconnected\"; backoff: to \"reconnecting\", the library's random wait"
echo " of 0-1 ms with its timer's granularity; handshake: TCP, WebSocket upgrade, hello and the"
echo " resumed welcome, through the cut proxy, to \"connected\". Each part is a median on its own:"
echo " the parts need not add up to the total.)"
echo
echo "clients.sh: done, load $(load)"

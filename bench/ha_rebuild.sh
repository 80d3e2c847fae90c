#!/usr/bin/env bash
# bench/ha_rebuild.sh - how fast a standby rebuilds its WAL from MySQL when it
# takes over (docs/ha.md, docs/benchmarks.md "Failover"): arq-sync-bench fills
# a private MariaDB with ROWS messages (128-byte payloads, as the drain writes
# them), then `arq-replay restore` - what the standby runs - rebuilds a WAL
# from it, once with every row and once with --tail (ha.rebuild_tail's
# default), each RUNS times alternating; the medians are printed as rows/s.
#   bench/ha_rebuild.sh [BUILD_DIR] [ROWS (default 200000)] [RUNS (default 3)]
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${1:-build}
ROWS=${2:-200000}
RUNS=${3:-3}
for b in bench/arq-sync-bench programs/arq-replay; do
    [ -x "$BUILD/$b" ] || { echo "ha_rebuild.sh: $BUILD/$b not built" >&2; exit 2; }
done
TMP=$(mktemp -d /var/tmp/arq-rebuildbench.XXXXXX)
trap 'scripts/mariadb stop "$TMP/mdb" >/dev/null 2>&1 || true; rm -rf "$TMP"' EXIT
URL=$(scripts/mariadb start "$TMP/mdb")
export DATABASE_URL=${URL#DATABASE_URL=}
echo "ha_rebuild.sh: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg), $ROWS rows"
"$BUILD/bench/arq-sync-bench" --database-url "$DATABASE_URL" --dir "$TMP/wal" --rows "$ROWS" \
    --json >/dev/null
run() { # restore options; prints seconds
    rm -rf "$TMP/new"
    local t0 t1
    t0=$(date +%s%N)
    "$BUILD/programs/arq-replay" restore --data-dir "$TMP/new" --no-progress "$@" >/dev/null || true
    t1=$(date +%s%N)
    [ -f "$TMP/new/data.mdb" ] || { echo "ha_rebuild.sh: restore built nothing" >&2; exit 1; }
    python3 -c "print(($t1 - $t0) / 1e9)"
}
all=() tail=()
for _ in $(seq 1 "$RUNS"); do
    all+=("$(run)")
    tail+=("$(run --tail 100000)")
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
ma=$(median "${all[@]}")
mt=$(median "${tail[@]}")
streams=$("$BUILD/programs/arq-replay" streams --data-dir "$TMP/new" --json 2>/dev/null |
    python3 -c 'import json,sys; print(len(json.load(sys.stdin)["streams"]))' 2>/dev/null || echo "?")
tailrows=$(python3 -c "print(min($ROWS, 100000 * int('$streams')) if '$streams'.isdigit() else '?')")
printf 'rebuild, all %s rows: median %.2f s (%.0f rows/s; runs: %s)\n' "$ROWS" "$ma" \
    "$(python3 -c "print($ROWS / $ma)")" "${all[*]}"
printf 'rebuild, --tail 100000 (%s streams): median %.2f s (runs: %s)\n' "$streams" "$mt" "${tail[*]}"

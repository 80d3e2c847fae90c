#!/usr/bin/env bash
# bench/sync.sh - arq-sync-bench against a private MariaDB (scripts/mariadb) with
# its data under /var/tmp, stopped and removed on exit. See docs/benchmarks.md.
#   bench/sync.sh [BUILD_DIR] [arq-sync-bench options, e.g. --rows 500000]
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${1:-build}
shift || true
[ -x "$BUILD/bench/arq-sync-bench" ] || {
    echo "sync.sh: $BUILD/bench/arq-sync-bench not built" >&2
    exit 2
}
TMP=$(mktemp -d /var/tmp/arq-syncbench.XXXXXX)
trap 'scripts/mariadb stop "$TMP/mdb" >/dev/null 2>&1 || true; rm -rf "$TMP"' EXIT
URL=$(scripts/mariadb start "$TMP/mdb")
echo "sync.sh: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg), $(mariadbd --version | cut -d' ' -f1-4)"
"$BUILD/bench/arq-sync-bench" --database-url "${URL#DATABASE_URL=}" --dir "$TMP/wal" "$@"

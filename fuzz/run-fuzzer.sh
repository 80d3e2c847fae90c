#!/usr/bin/env bash
# fuzz/run-fuzzer.sh - run one libFuzzer target for a fixed time (used by the
# 'fuzz' test suite when meson option fuzzing=true).
#
# usage: run-fuzzer.sh FUZZ_EXE CORPUS_DIR SECONDS
#
# The committed corpus is copied to a scratch directory first, so fuzzing
# never writes into the repository. On success the scratch directory is
# removed (new inputs found during the run are discarded). On failure it is
# kept, and the crashing input is named so it can be committed as a
# regression input.
set -euo pipefail

if [[ $# -ne 3 ]]; then
    echo "usage: $0 FUZZ_EXE CORPUS_DIR SECONDS" >&2
    exit 2
fi
exe=$(realpath -- "$1")
corpus=$(realpath -- "$2")
seconds=$3
name=$(basename "$corpus")

if [[ ! -x $exe ]]; then
    echo "run-fuzzer: '$exe' is not an executable" >&2
    exit 2
fi
if [[ ! -d $corpus ]]; then
    echo "run-fuzzer: corpus directory '$corpus' does not exist" >&2
    exit 2
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/arq-fuzz-$name.XXXXXX")
mkdir "$tmp/corpus"
find "$corpus" -mindepth 1 -maxdepth 1 -type f -exec cp -- {} "$tmp/corpus/" \;
if [[ -z $(ls -A "$tmp/corpus") ]]; then
    echo "run-fuzzer: corpus directory '$corpus' holds no input files" >&2
    rm -rf -- "$tmp"
    exit 2
fi

# UBSan only reports and carries on unless told to stop; make it a crash
# libFuzzer can record. Leave any caller's settings alone.
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}

echo "run-fuzzer: fuzzing '$name' for ${seconds}s (scratch dir $tmp)"
rc=0
"$exe" \
    -max_total_time="$seconds" \
    -timeout=10 \
    -rss_limit_mb=2048 \
    -malloc_limit_mb=512 \
    -artifact_prefix="$tmp/" \
    -print_final_stats=1 \
    "$tmp/corpus" || rc=$?

if [[ $rc -eq 0 ]]; then
    rm -rf -- "$tmp"
    echo "run-fuzzer: '$name' ran ${seconds}s without finding a failure"
    exit 0
fi

echo >&2
echo "run-fuzzer: fuzz target '$name' FAILED (exit $rc)" >&2
shopt -s nullglob
artifacts=("$tmp"/crash-* "$tmp"/leak-* "$tmp"/timeout-* "$tmp"/oom-*)
if [[ ${#artifacts[@]} -eq 0 ]]; then
    echo "run-fuzzer: no failing input was saved; see the fuzzer output above" >&2
    echo "run-fuzzer: scratch dir kept: $tmp" >&2
    exit 1
fi
for a in "${artifacts[@]}"; do
    echo "run-fuzzer: failing input: $a" >&2
done
first=${artifacts[0]}
cat >&2 <<EOF
run-fuzzer: to reproduce:  $exe $first
run-fuzzer: fix the bug, then commit the input as a regression input, so every
run-fuzzer: build replays it from then on:
run-fuzzer:   cp $first $corpus/
run-fuzzer:   git add $corpus/$(basename "$first")
EOF
exit 1

/*
 * replay_range.h - arq-replay's offset arguments: --from, --to and --range.
 * Pure functions: no I/O, no allocation, safe on any input (fuzzed by
 * fuzz/replay_range.c).
 *
 * A bound is one of
 *   N                 an offset: decimal digits only, 1 .. 2^64-2 (no sign,
 *                     no spaces, no leading zeros except "0" itself, which
 *                     is refused as offsets start at 1)
 *   first | earliest  the stream's first offset still held
 *   last  | latest    the stream's last offset
 *   KEYWORD+N, KEYWORD-N   relative to it (last-99 with --from: the last 100)
 * A range is "A..B", "A..", "..B", ".." (everything) or "A" (just A).
 */
#ifndef ARQ_REPLAY_RANGE_H
#define ARQ_REPLAY_RANGE_H

#include <stddef.h>
#include <stdint.h>

enum replay_bound_kind {
    REPLAY_BOUND_OFFSET = 0, /* value */
    REPLAY_BOUND_FIRST = 1,  /* first + delta (delta signed by neg) */
    REPLAY_BOUND_LAST = 2,   /* last + delta */
};

typedef struct replay_bound {
    enum replay_bound_kind kind;
    uint64_t value; /* REPLAY_BOUND_OFFSET: the offset */
    uint64_t delta; /* relative kinds: the distance */
    int neg;        /* relative kinds: 1 for KEYWORD-N */
} replay_bound_t;

typedef struct replay_range {
    int has_from, has_to;
    replay_bound_t from, to;
} replay_range_t;

/* Parse a decimal unsigned number s[0..len) (digits only, no leading zero
 * unless it is "0", at most UINT64_MAX). 0 or -1; *ret untouched on -1. */
int replay_parse_u64(const char *s, size_t len, uint64_t *ret);

/* Parse one bound. 0, or -1 (nothing written). */
int replay_bound_parse(const char *s, size_t len, replay_bound_t *ret);

/* Parse a range. 0, or -1 (nothing written). */
int replay_range_parse(const char *s, size_t len, replay_range_t *ret);

/*
 * Resolve r against a stream holding offsets first..last (last = first - 1
 * when it holds none). A missing from is `first`, a missing to is `last`.
 * Relative bounds saturate (last-1000 on a short stream is offset 1; never
 * 0). Returns 0 with *ret_from, *ret_to (*ret_from > *ret_to: empty), or -1
 * when both bounds are plain offsets and from > to (a usage error).
 */
int replay_range_resolve(const replay_range_t *r, uint64_t first, uint64_t last, uint64_t *ret_from,
                         uint64_t *ret_to);

/* Write r in its canonical form ("A..B", "first+3..", ...) into buf (NUL-
 * terminated). Returns the length, or -1 if cap is too small. Parsing the
 * result gives r back. */
int replay_range_format(const replay_range_t *r, char *buf, size_t cap);

#endif

/*
 * Fuzz arq-replay's offset and range arguments (programs/replay_range.c):
 * the input is "RANGE" or "RANGE\nFIRST\nLAST". Any input is accepted or
 * refused without touching memory it does not own; an accepted range
 * formats to a canonical string that parses back to the same range, and
 * resolving it against a stream never yields offset 0 or UINT64_MAX and
 * honours the bounds it was given.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "replay_range.h"

static int same_bound(const replay_bound_t *a, const replay_bound_t *b)
{
    return a->kind == b->kind && a->value == b->value && a->delta == b->delta && a->neg == b->neg;
}

static uint64_t field(const uint8_t *p, size_t n, uint64_t dflt)
{
    uint64_t v;
    return replay_parse_u64((const char *)p, n, &v) == 0 ? v : dflt;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size > 4096)
        return 0;
    /* Exactly `size` bytes of heap, so ASan sees any read past the end. */
    const uint8_t *nl = memchr(data, '\n', size);
    size_t rlen = nl ? (size_t)(nl - data) : size;
    uint64_t first = 1, last = 100;
    if (nl) {
        const uint8_t *rest = nl + 1;
        size_t rest_len = size - rlen - 1;
        const uint8_t *nl2 = memchr(rest, '\n', rest_len);
        size_t flen = nl2 ? (size_t)(nl2 - rest) : rest_len;
        first = field(rest, flen, 1);
        if (nl2)
            last = field(nl2 + 1, rest_len - flen - 1, 100);
    }
    char *s = malloc(rlen ? rlen : 1);
    if (!s)
        return 0;
    memcpy(s, data, rlen);

    replay_bound_t b;
    if (replay_bound_parse(s, rlen, &b) == 0 && b.kind == REPLAY_BOUND_OFFSET &&
        (b.value == 0 || b.value == UINT64_MAX))
        abort();

    replay_range_t r;
    if (replay_range_parse(s, rlen, &r) == 0) {
        char buf[128];
        int n = replay_range_format(&r, buf, sizeof(buf));
        if (n < 0)
            abort(); /* two bounds of at most 29 bytes each always fit */
        replay_range_t back;
        if (replay_range_parse(buf, (size_t)n, &back) != 0 || back.has_from != r.has_from ||
            back.has_to != r.has_to || (r.has_from && !same_bound(&back.from, &r.from)) ||
            (r.has_to && !same_bound(&back.to, &r.to)))
            abort();
        uint64_t from, to;
        if (replay_range_resolve(&r, first, last, &from, &to) == 0) {
            if (from == 0 || from == UINT64_MAX || to == UINT64_MAX)
                abort();
            uint64_t want_first = first == 0 ? 1 : first == UINT64_MAX ? UINT64_MAX - 1 : first;
            if (!r.has_from && from != want_first)
                abort();
            if (r.has_from && r.from.kind == REPLAY_BOUND_OFFSET && from != r.from.value)
                abort();
            if (r.has_to && r.to.kind == REPLAY_BOUND_OFFSET && to != r.to.value)
                abort();
            if (!r.has_to && to != (last == UINT64_MAX ? UINT64_MAX - 1 : last))
                abort();
        } else if (!(r.has_from && r.has_to && r.from.kind == REPLAY_BOUND_OFFSET &&
                     r.to.kind == REPLAY_BOUND_OFFSET && r.from.value > r.to.value)) {
            abort(); /* only an inverted pair of plain offsets is refused */
        }
    }
    free(s);
    return 0;
}

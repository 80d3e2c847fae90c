/*
 * replay_range.c - arq-replay's offset arguments (see replay_range.h).
 */
#include "replay_range.h"

#include <inttypes.h>
#include <stdio.h>
#include <string.h>

int replay_parse_u64(const char *s, size_t len, uint64_t *ret)
{
    if (!s || len == 0 || len > 20 || (len > 1 && s[0] == '0'))
        return -1;
    uint64_t v = 0;
    for (size_t i = 0; i < len; i++) {
        if (s[i] < '0' || s[i] > '9')
            return -1;
        unsigned d = (unsigned)(s[i] - '0');
        if (v > (UINT64_MAX - d) / 10)
            return -1;
        v = v * 10 + d;
    }
    *ret = v;
    return 0;
}

static int keyword(const char *s, size_t len, const char *kw)
{
    size_t n = strlen(kw);
    return len == n && memcmp(s, kw, n) == 0;
}

int replay_bound_parse(const char *s, size_t len, replay_bound_t *ret)
{
    if (!s || len == 0)
        return -1;
    replay_bound_t b = {0};
    if (s[0] >= '0' && s[0] <= '9') {
        /* 0 is no offset; UINT64_MAX is kept free so that to + 1 exists */
        if (replay_parse_u64(s, len, &b.value) || b.value == 0 || b.value == UINT64_MAX)
            return -1;
        b.kind = REPLAY_BOUND_OFFSET;
        *ret = b;
        return 0;
    }
    size_t k = 0;
    while (k < len && s[k] != '+' && s[k] != '-')
        k++;
    if (keyword(s, k, "first") || keyword(s, k, "earliest"))
        b.kind = REPLAY_BOUND_FIRST;
    else if (keyword(s, k, "last") || keyword(s, k, "latest"))
        b.kind = REPLAY_BOUND_LAST;
    else
        return -1;
    if (k < len) {
        b.neg = s[k] == '-';
        if (replay_parse_u64(s + k + 1, len - k - 1, &b.delta))
            return -1;
        if (b.delta == 0)
            b.neg = 0; /* first-0 is first: one canonical form */
    }
    *ret = b;
    return 0;
}

int replay_range_parse(const char *s, size_t len, replay_range_t *ret)
{
    if (!s || len == 0)
        return -1;
    replay_range_t r = {0};
    const char *dots = NULL;
    for (size_t i = 0; i + 1 < len; i++) {
        if (s[i] == '.' && s[i + 1] == '.') {
            dots = s + i;
            break;
        }
    }
    if (!dots) {
        if (replay_bound_parse(s, len, &r.from))
            return -1;
        r.to = r.from;
        r.has_from = r.has_to = 1;
        *ret = r;
        return 0;
    }
    size_t a = (size_t)(dots - s), b = len - a - 2;
    if (a) {
        if (replay_bound_parse(s, a, &r.from))
            return -1;
        r.has_from = 1;
    }
    if (b) {
        if (replay_bound_parse(dots + 2, b, &r.to))
            return -1;
        r.has_to = 1;
    }
    *ret = r;
    return 0;
}

static uint64_t bound_value(const replay_bound_t *b, uint64_t first, uint64_t last)
{
    if (b->kind == REPLAY_BOUND_OFFSET)
        return b->value;
    uint64_t base = b->kind == REPLAY_BOUND_FIRST ? first : last;
    if (b->neg)
        return base > b->delta ? base - b->delta : 0;
    return base < UINT64_MAX - b->delta ? base + b->delta : UINT64_MAX - 1;
}

int replay_range_resolve(const replay_range_t *r, uint64_t first, uint64_t last, uint64_t *ret_from,
                         uint64_t *ret_to)
{
    if (first == 0)
        first = 1;
    if (r->has_from && r->has_to && r->from.kind == REPLAY_BOUND_OFFSET &&
        r->to.kind == REPLAY_BOUND_OFFSET && r->from.value > r->to.value)
        return -1;
    uint64_t from = r->has_from ? bound_value(&r->from, first, last) : first;
    uint64_t to = r->has_to ? bound_value(&r->to, first, last) : last;
    if (from == 0)
        from = 1;
    if (from == UINT64_MAX)
        from = UINT64_MAX - 1;
    if (to == UINT64_MAX)
        to = UINT64_MAX - 1;
    *ret_from = from;
    *ret_to = to;
    return 0;
}

static int bound_format(const replay_bound_t *b, char *buf, size_t cap)
{
    int n;
    if (b->kind == REPLAY_BOUND_OFFSET)
        n = snprintf(buf, cap, "%" PRIu64, b->value);
    else if (b->delta == 0)
        n = snprintf(buf, cap, "%s", b->kind == REPLAY_BOUND_FIRST ? "first" : "last");
    else
        n = snprintf(buf, cap, "%s%c%" PRIu64, b->kind == REPLAY_BOUND_FIRST ? "first" : "last",
                     b->neg ? '-' : '+', b->delta);
    return n < 0 || (size_t)n >= cap ? -1 : n;
}

static int bound_eq(const replay_bound_t *a, const replay_bound_t *b)
{
    return a->kind == b->kind && a->value == b->value && a->delta == b->delta && a->neg == b->neg;
}

int replay_range_format(const replay_range_t *r, char *buf, size_t cap)
{
    if (!buf || cap == 0)
        return -1;
    size_t len = 0;
    if (r->has_from && r->has_to && bound_eq(&r->from, &r->to))
        return bound_format(&r->from, buf, cap);
    buf[0] = 0;
    if (r->has_from) {
        int n = bound_format(&r->from, buf, cap);
        if (n < 0)
            return -1;
        len = (size_t)n;
    }
    if (len + 3 > cap)
        return -1;
    memcpy(buf + len, "..", 3);
    len += 2;
    if (r->has_to) {
        int n = bound_format(&r->to, buf + len, cap - len);
        if (n < 0)
            return -1;
        len += (size_t)n;
    }
    return (int)len;
}

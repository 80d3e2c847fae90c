/*
 * admit.c - per-address connection counts and connection-rate buckets
 * (admit.h). An open-addressing table keyed by the 16-byte address; entries
 * live while the address has connections or an unrefilled bucket, so the
 * table is bounded by open connections plus addresses seen within the last
 * burst / rate seconds.
 */
#include "admit.h"

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#define SCALE 1000000ull /* tokens are kept in millionths */

struct entry {
    uint8_t addr[16];
    bool used;
    uint32_t conns;
    uint64_t tokens; /* * SCALE */
    int64_t at_us;   /* when tokens was last brought up to date */
};

struct api_admit {
    api_admit_options_t o;
    struct entry *slots;
    size_t cap, n, connected;
};

static uint64_t hash16(const uint8_t *a)
{
    uint64_t h = 1469598103934665603ull;
    for (int i = 0; i < 16; i++)
        h = (h ^ a[i]) * 1099511628211ull;
    return h ^ (h >> 29);
}

static uint64_t burst(const api_admit_t *a)
{
    uint64_t b = a->o.burst ? a->o.burst : a->o.rate_per_s;
    return (b ? b : 1) * SCALE;
}

int api_admit_new(const api_admit_options_t *opts, api_admit_t **ret)
{
    api_admit_t *a = calloc(1, sizeof(*a));
    if (!a)
        return -1;
    a->o = *opts;
    a->cap = 256;
    a->slots = calloc(a->cap, sizeof(*a->slots));
    if (!a->slots) {
        free(a);
        return -1;
    }
    *ret = a;
    return 0;
}

void api_admit_free(api_admit_t *a)
{
    if (!a)
        return;
    free(a->slots);
    free(a);
}

void api_admit_set(api_admit_t *a, const api_admit_options_t *opts)
{
    a->o = *opts;
}

static struct entry *find(const api_admit_t *a, const uint8_t *addr)
{
    size_t mask = a->cap - 1;
    for (size_t i = hash16(addr) & mask;; i = (i + 1) & mask) {
        struct entry *e = &a->slots[i];
        if (!e->used)
            return NULL;
        if (memcmp(e->addr, addr, 16) == 0)
            return e;
    }
}

static struct entry *insert_slot(struct entry *slots, size_t cap, const uint8_t *addr)
{
    size_t mask = cap - 1;
    size_t i = hash16(addr) & mask;
    while (slots[i].used)
        i = (i + 1) & mask;
    return &slots[i];
}

static int rehash(api_admit_t *a, size_t ncap)
{
    struct entry *ns = calloc(ncap, sizeof(*ns));
    if (!ns)
        return -1;
    for (size_t i = 0; i < a->cap; i++)
        if (a->slots[i].used)
            *insert_slot(ns, ncap, a->slots[i].addr) = a->slots[i];
    free(a->slots);
    a->slots = ns;
    a->cap = ncap;
    return 0;
}

/* Remove e, keeping every probe chain intact (backward shift). */
static void remove_entry(api_admit_t *a, struct entry *e)
{
    size_t mask = a->cap - 1;
    size_t i = (size_t)(e - a->slots);
    a->slots[i].used = false;
    a->n--;
    for (size_t j = (i + 1) & mask; a->slots[j].used; j = (j + 1) & mask) {
        size_t home = hash16(a->slots[j].addr) & mask;
        /* move j to i if its home is not in (i, j] (cyclically) */
        bool stays = i <= j ? (home > i && home <= j) : (home > i || home <= j);
        if (!stays) {
            a->slots[i] = a->slots[j];
            a->slots[j].used = false;
            i = j;
        }
    }
}

static void refill(const api_admit_t *a, struct entry *e, int64_t now_us)
{
    if (now_us <= e->at_us)
        return;
    uint64_t add = (uint64_t)(now_us - e->at_us) * a->o.rate_per_s; /* SCALE per second = us */
    uint64_t cap = burst(a);
    e->tokens = e->tokens + add >= cap || add / a->o.rate_per_s != (uint64_t)(now_us - e->at_us)
                    ? cap
                    : e->tokens + add;
    e->at_us = now_us;
}

enum api_admit_verdict api_admit_take(api_admit_t *a, const uint8_t addr[16], int64_t now_us,
                                      int *ret_counted)
{
    *ret_counted = 0;
    if (!a->o.max_per_addr && !a->o.rate_per_s)
        return API_ADMIT_OK;
    struct entry *e = find(a, addr);
    if (!e) {
        if ((a->n + 1) * 4 > a->cap * 3 && rehash(a, a->cap * 2) != 0)
            return API_ADMIT_OK;
        e = insert_slot(a->slots, a->cap, addr);
        memset(e, 0, sizeof(*e));
        memcpy(e->addr, addr, 16);
        e->used = true;
        e->tokens = burst(a);
        e->at_us = now_us;
        a->n++;
    }
    if (a->o.max_per_addr && e->conns >= a->o.max_per_addr)
        return API_ADMIT_TOO_MANY;
    if (a->o.rate_per_s) {
        refill(a, e, now_us);
        if (e->tokens < SCALE)
            return API_ADMIT_TOO_FAST;
        e->tokens -= SCALE;
    }
    if (e->conns++ == 0)
        a->connected++;
    *ret_counted = 1;
    return API_ADMIT_OK;
}

void api_admit_release(api_admit_t *a, const uint8_t addr[16])
{
    struct entry *e = find(a, addr);
    if (!e || e->conns == 0)
        return;
    if (--e->conns == 0) {
        a->connected--;
        if (!a->o.rate_per_s)
            remove_entry(a, e); /* nothing to remember */
    }
}

size_t api_admit_sweep(api_admit_t *a, int64_t now_us)
{
    size_t dropped = 0;
    for (size_t i = 0; i < a->cap;) {
        struct entry *e = &a->slots[i];
        if (e->used && e->conns == 0) {
            if (a->o.rate_per_s)
                refill(a, e, now_us);
            if (!a->o.rate_per_s || e->tokens >= burst(a)) {
                remove_entry(a, e); /* may move another entry into slot i */
                dropped++;
                continue;
            }
        }
        i++;
    }
    return dropped;
}

size_t api_admit_addresses(const api_admit_t *a)
{
    return a->n;
}

size_t api_admit_connected(const api_admit_t *a)
{
    return a->connected;
}

void api_admit_addr4(uint32_t ip_be, uint8_t out[16])
{
    memset(out, 0, 10);
    out[10] = out[11] = 0xff;
    memcpy(out + 12, &ip_be, 4);
}

void api_admit_addr6(const uint8_t ip[16], uint8_t out[16])
{
    memcpy(out, ip, 8);
    memset(out + 8, 0, 8);
}

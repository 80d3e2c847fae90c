/*
 * brk_owners.c - sessions per owner (broker_int.h). Two hash tables with
 * chaining: owners by key, each with its sessions oldest first (a doubly
 * linked list), and sessions by id, to remove one in O(1) when it expires.
 */
#include "broker_int.h"

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define SCALE 1000000ull /* rate tokens in millionths */

struct owner;

struct snode {
    char *id;
    struct owner *owner;
    struct snode *prev, *next; /* the owner's list, oldest first */
    struct snode *hnext;       /* the id table */
};

struct owner {
    char *key;
    bool is_addr;
    uint32_t n;
    struct snode *head, *tail;
    uint64_t tokens;
    int64_t at_us;
    struct owner *hnext;
};

struct brk_owners {
    brk_owners_limits_t lim;
    struct owner **owners;
    size_t n_obuckets, n_owners;
    struct snode **ids;
    size_t n_ibuckets, n_ids;
};

static uint64_t hash_str(const char *s, bool salt)
{
    uint64_t h = salt ? 0x9e3779b97f4a7c15ull : 1469598103934665603ull;
    for (; *s; s++)
        h = (h ^ (uint8_t)*s) * 1099511628211ull;
    return h ^ (h >> 31);
}

int brk_owners_new(const brk_owners_limits_t *lim, brk_owners_t **ret)
{
    brk_owners_t *o = calloc(1, sizeof(*o));
    if (!o)
        return -1;
    o->lim = *lim;
    o->n_obuckets = o->n_ibuckets = 1024;
    o->owners = calloc(o->n_obuckets, sizeof(*o->owners));
    o->ids = calloc(o->n_ibuckets, sizeof(*o->ids));
    if (!o->owners || !o->ids) {
        brk_owners_free(o);
        return -1;
    }
    *ret = o;
    return 0;
}

void brk_owners_free(brk_owners_t *o)
{
    if (!o)
        return;
    for (size_t i = 0; o->owners && i < o->n_obuckets; i++) {
        struct owner *w = o->owners[i];
        while (w) {
            struct owner *next = w->hnext;
            for (struct snode *n = w->head; n;) {
                struct snode *nn = n->next;
                free(n->id);
                free(n);
                n = nn;
            }
            free(w->key);
            free(w);
            w = next;
        }
    }
    free(o->owners);
    free(o->ids);
    free(o);
}

void brk_owners_set(brk_owners_t *o, const brk_owners_limits_t *lim)
{
    o->lim = *lim;
}

/* Double a chained table when its load passes 1 (rehashing every entry). */
static void grow_owners(brk_owners_t *o)
{
    size_t nb = o->n_obuckets * 2;
    struct owner **t = calloc(nb, sizeof(*t));
    if (!t)
        return; /* longer chains, still correct */
    for (size_t i = 0; i < o->n_obuckets; i++)
        for (struct owner *w = o->owners[i], *next; w; w = next) {
            next = w->hnext;
            size_t j = hash_str(w->key, w->is_addr) % nb;
            w->hnext = t[j];
            t[j] = w;
        }
    free(o->owners);
    o->owners = t;
    o->n_obuckets = nb;
}

static void grow_ids(brk_owners_t *o)
{
    size_t nb = o->n_ibuckets * 2;
    struct snode **t = calloc(nb, sizeof(*t));
    if (!t)
        return;
    for (size_t i = 0; i < o->n_ibuckets; i++)
        for (struct snode *n = o->ids[i], *next; n; n = next) {
            next = n->hnext;
            size_t j = hash_str(n->id, false) % nb;
            n->hnext = t[j];
            t[j] = n;
        }
    free(o->ids);
    o->ids = t;
    o->n_ibuckets = nb;
}

static struct owner *owner_find(const brk_owners_t *o, const char *key, bool is_addr)
{
    for (struct owner *w = o->owners[hash_str(key, is_addr) % o->n_obuckets]; w; w = w->hnext)
        if (w->is_addr == is_addr && strcmp(w->key, key) == 0)
            return w;
    return NULL;
}

static uint64_t burst(const brk_owners_t *o)
{
    uint64_t b = o->lim.burst ? o->lim.burst : o->lim.rate;
    return (b ? b : 1) * SCALE;
}

static struct owner *owner_get(brk_owners_t *o, const char *key, bool is_addr, int64_t now_us)
{
    struct owner *w = owner_find(o, key, is_addr);
    if (w)
        return w;
    w = calloc(1, sizeof(*w));
    if (!w)
        return NULL;
    w->key = strdup(key);
    if (!w->key) {
        free(w);
        return NULL;
    }
    w->is_addr = is_addr;
    w->tokens = burst(o);
    w->at_us = now_us;
    if (o->n_owners + 1 > o->n_obuckets)
        grow_owners(o);
    size_t i = hash_str(key, is_addr) % o->n_obuckets;
    w->hnext = o->owners[i];
    o->owners[i] = w;
    o->n_owners++;
    return w;
}

static void refill(const brk_owners_t *o, struct owner *w, int64_t now_us)
{
    if (!o->lim.rate || now_us <= w->at_us)
        return;
    uint64_t dt = (uint64_t)(now_us - w->at_us), add = dt * o->lim.rate;
    w->tokens = add / o->lim.rate != dt || w->tokens + add > burst(o) ? burst(o) : w->tokens + add;
    w->at_us = now_us;
}

static int64_t mono_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* An owner with no sessions and a full bucket is forgotten. */
static void owner_maybe_free(brk_owners_t *o, struct owner *w)
{
    refill(o, w, mono_us());
    if (w->n || (o->lim.rate && w->tokens < burst(o)))
        return;
    for (struct owner **pp = &o->owners[hash_str(w->key, w->is_addr) % o->n_obuckets]; *pp;
         pp = &(*pp)->hnext)
        if (*pp == w) {
            *pp = w->hnext;
            free(w->key);
            free(w);
            o->n_owners--;
            return;
        }
}

enum brk_owners_verdict brk_owners_admit(brk_owners_t *o, const char *key, int is_addr,
                                         int64_t now_us, int (*live)(const char *id, void *arg),
                                         void *arg, char *ret_evict)
{
    struct owner *w = owner_get(o, key, is_addr != 0, now_us);
    if (!w)
        return BRK_OWNERS_OK; /* out of memory: a limiter must not lock clients out */
    refill(o, w, now_us);
    if (o->lim.rate && w->tokens < SCALE)
        return BRK_OWNERS_TOO_FAST;
    uint32_t limit = is_addr ? o->lim.per_addr : o->lim.per_owner;
    enum brk_owners_verdict v = BRK_OWNERS_OK;
    if (limit && w->n >= limit) {
        struct snode *n = w->head;
        while (n && live(n->id, arg))
            n = n->next;
        if (!n)
            return BRK_OWNERS_TOO_MANY;
        strcpy(ret_evict, n->id);
        v = BRK_OWNERS_EVICT;
    }
    if (o->lim.rate)
        w->tokens -= SCALE;
    return v;
}

int brk_owners_add(brk_owners_t *o, const char *key, int is_addr, const char *id)
{
    brk_owners_remove(o, id); /* re-recorded: newest again */
    struct owner *w = owner_get(o, key, is_addr != 0, mono_us());
    if (!w)
        return -1;
    struct snode *n = calloc(1, sizeof(*n));
    if (!n || !(n->id = strdup(id))) {
        free(n);
        owner_maybe_free(o, w);
        return -1;
    }
    n->owner = w;
    n->prev = w->tail;
    if (w->tail)
        w->tail->next = n;
    else
        w->head = n;
    w->tail = n;
    w->n++;
    if (o->n_ids + 1 > o->n_ibuckets)
        grow_ids(o);
    size_t i = hash_str(id, false) % o->n_ibuckets;
    n->hnext = o->ids[i];
    o->ids[i] = n;
    o->n_ids++;
    return 0;
}

void brk_owners_remove(brk_owners_t *o, const char *id)
{
    for (struct snode **pp = &o->ids[hash_str(id, false) % o->n_ibuckets]; *pp;
         pp = &(*pp)->hnext) {
        struct snode *n = *pp;
        if (strcmp(n->id, id) != 0)
            continue;
        *pp = n->hnext;
        o->n_ids--;
        struct owner *w = n->owner;
        if (n->prev)
            n->prev->next = n->next;
        else
            w->head = n->next;
        if (n->next)
            n->next->prev = n->prev;
        else
            w->tail = n->prev;
        w->n--;
        free(n->id);
        free(n);
        owner_maybe_free(o, w);
        return;
    }
}

size_t brk_owners_sessions(const brk_owners_t *o)
{
    return o->n_ids;
}

/*
 * broker_int.h - what the broker's files share (not a public header).
 *   broker.c       streams, subscriptions, publishes, sessions
 *   brk_owners.c   sessions per owner: counts, the oldest to evict, rates
 */
#ifndef ARQ_BROKER_INT_H
#define ARQ_BROKER_INT_H

#include <stddef.h>
#include <stdint.h>

/*
 * Who owns which sessions, so that no owner (a token subject; an anonymous
 * client's address) can create sessions without bound: each has a count
 * limit (the oldest session it does not hold open is evicted to make room)
 * and a creation rate (a token bucket). Sessions recorded in the WAL are
 * indexed at start; anonymous ones are attributed to their address only
 * while this process runs (the WAL keeps no address).
 */
typedef struct brk_owners brk_owners_t;

typedef struct brk_owners_limits {
    uint32_t per_owner; /* sessions per token subject (0: no limit) */
    uint32_t per_addr;  /* sessions per anonymous address (0: no limit) */
    uint32_t rate;      /* new sessions per second per owner (0: no limit) */
    uint32_t burst;     /* ... at once */
} brk_owners_limits_t;

int brk_owners_new(const brk_owners_limits_t *lim, brk_owners_t **ret);
void brk_owners_free(brk_owners_t *o);
void brk_owners_set(brk_owners_t *o, const brk_owners_limits_t *lim);

enum brk_owners_verdict {
    BRK_OWNERS_OK = 0,
    BRK_OWNERS_EVICT = 1,    /* at the limit: evict *ret_evict first (then add) */
    BRK_OWNERS_TOO_MANY = 2, /* at the limit and every session is held open */
    BRK_OWNERS_TOO_FAST = 3, /* the owner's creation rate */
};

/*
 * May `key` (is_addr: an address, else a token subject) create a session
 * now (CLOCK_MONOTONIC now_us)? BRK_OWNERS_OK takes a token of the rate;
 * BRK_OWNERS_EVICT too, and names in ret_evict (WAL_SESSION_MAX + 1 bytes)
 * the oldest session of the owner for which live(id, arg) is 0.
 */
enum brk_owners_verdict brk_owners_admit(brk_owners_t *o, const char *key, int is_addr,
                                         int64_t now_us, int (*live)(const char *id, void *arg),
                                         void *arg, char *ret_evict);
/* Record session id as key's (newest). 0, or -1 (out of memory). */
int brk_owners_add(brk_owners_t *o, const char *key, int is_addr, const char *id);
/* Forget session id (expired, evicted, deleted); unknown ids are ignored. */
void brk_owners_remove(brk_owners_t *o, const char *id);
size_t brk_owners_sessions(const brk_owners_t *o);

#endif

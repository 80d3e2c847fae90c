/*
 * admit.h - who may open a connection: at most max_per_addr connections per
 * client address at once, and new connections per address limited by a
 * token bucket (rate_per_s, burst). So one address (or one attacker) cannot
 * take all of max_connections, nor churn through them. For the listener;
 * one event-loop thread, no locking.
 *
 * Addresses are 16 bytes (IPv4 as ::ffff:a.b.c.d). IPv6 addresses are
 * counted per /64, which is what one host controls.
 */
#ifndef ARQ_API_ADMIT_H
#define ARQ_API_ADMIT_H

#include <stddef.h>
#include <stdint.h>

typedef struct api_admit api_admit_t;

typedef struct api_admit_options {
    uint32_t max_per_addr; /* connections at once per address; 0: no limit */
    uint32_t rate_per_s;   /* new connections per second per address; 0: no limit */
    uint32_t burst;        /* ... above the rate, at once (0: rate_per_s) */
} api_admit_options_t;

enum api_admit_verdict {
    API_ADMIT_OK = 0,
    API_ADMIT_TOO_MANY = 1, /* max_per_addr connections are open */
    API_ADMIT_TOO_FAST = 2, /* the address used up its bucket */
};

/* 0, or -1 (out of memory). */
int api_admit_new(const api_admit_options_t *opts, api_admit_t **ret);
void api_admit_free(api_admit_t *a);

/* Replace the limits (reload); counts are kept. */
void api_admit_set(api_admit_t *a, const api_admit_options_t *opts);

/* A connection from addr at now_us (CLOCK_MONOTONIC): API_ADMIT_OK counts
 * it (release it later with api_admit_release), anything else does not.
 * Out of memory admits without counting (a limiter must not lock clients
 * out) and returns API_ADMIT_OK with *ret_counted 0. */
enum api_admit_verdict api_admit_take(api_admit_t *a, const uint8_t addr[16], int64_t now_us,
                                      int *ret_counted);
void api_admit_release(api_admit_t *a, const uint8_t addr[16]);

/* Forget addresses without connections whose bucket is full again (call
 * now and then, e.g. every second). Returns how many were dropped. */
size_t api_admit_sweep(api_admit_t *a, int64_t now_us);

/* Addresses tracked, and of those with connections open now. */
size_t api_admit_addresses(const api_admit_t *a);
size_t api_admit_connected(const api_admit_t *a);

/* The 16-byte form of an IPv4 address (network order) or of an IPv6 one,
 * reduced to its /64. */
void api_admit_addr4(uint32_t ip_be, uint8_t out[16]);
void api_admit_addr6(const uint8_t ip[16], uint8_t out[16]);

#endif

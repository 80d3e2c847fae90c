/*
 * addr.h - IP addresses and CIDR ranges (IPv4 and IPv6) for the address
 * rules of the api: which peers are trusted proxies, who may read /metrics.
 * Pure functions, no allocation, no I/O.
 */
#ifndef ARQ_API_ADDR_H
#define ARQ_API_ADDR_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* An address: family 4 or 6; IPv4 in the first 4 bytes. An IPv4-mapped
 * IPv6 address (::ffff:a.b.c.d) is stored as the IPv4 address. */
typedef struct api_addr {
    uint8_t family;
    uint8_t bytes[16];
} api_addr_t;

/* A range: the address with the host bits cleared, and the prefix length. */
typedef struct api_cidr {
    api_addr_t net;
    uint8_t bits;
} api_cidr_t;

/* Parse "192.0.2.7" or "2001:db8::1" (surrounding spaces not allowed).
 * Returns 0, or -1 if s is not an address. */
int api_addr_parse(const char *s, size_t len, api_addr_t *ret);

/* Parse "10.0.0.0/8", "fd00::/8", or a single address (a /32 or /128).
 * Host bits set below the prefix ("10.1.2.3/8") are an error, so that a
 * typo does not widen or narrow a rule unseen. Returns 0, or -1 with a
 * static reason in *why. */
int api_cidr_parse(const char *s, api_cidr_t *ret, const char **why);

/* Is a inside one of the n ranges? */
bool api_cidr_match(const api_cidr_t *ranges, size_t n, const api_addr_t *a);

/* Write a as text (INET6_ADDRSTRLEN bytes are enough). */
void api_addr_format(const api_addr_t *a, char *out, size_t outlen);

#endif

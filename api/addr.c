/* addr.c - IP addresses and CIDR ranges (see addr.h). */
#include "addr.h"

#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int api_addr_parse(const char *s, size_t len, api_addr_t *ret)
{
    char buf[64];
    if (len == 0 || len >= sizeof(buf))
        return -1;
    memcpy(buf, s, len);
    buf[len] = '\0';
    api_addr_t a = {0};
    if (inet_pton(AF_INET, buf, a.bytes) == 1) {
        a.family = 4;
    } else if (inet_pton(AF_INET6, buf, a.bytes) == 1) {
        static const uint8_t mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
        if (memcmp(a.bytes, mapped, sizeof(mapped)) == 0) {
            memmove(a.bytes, a.bytes + 12, 4);
            memset(a.bytes + 4, 0, 12);
            a.family = 4;
        } else {
            a.family = 6;
        }
    } else {
        return -1;
    }
    *ret = a;
    return 0;
}

int api_cidr_parse(const char *s, api_cidr_t *ret, const char **why)
{
    const char *slash = strchr(s, '/');
    size_t alen = slash ? (size_t)(slash - s) : strlen(s);
    api_cidr_t c = {0};
    if (api_addr_parse(s, alen, &c.net) != 0) {
        *why = "not an IPv4 or IPv6 address or CIDR range";
        return -1;
    }
    unsigned max = c.net.family == 4 ? 32 : 128;
    unsigned bits = max;
    if (slash) {
        const char *p = slash + 1;
        if (*p < '0' || *p > '9' || strlen(p) > 3) {
            *why = "bad prefix length";
            return -1;
        }
        bits = 0;
        for (; *p; p++) {
            if (*p < '0' || *p > '9') {
                *why = "bad prefix length";
                return -1;
            }
            bits = bits * 10 + (unsigned)(*p - '0');
        }
        if (bits > max) {
            *why = "prefix length too long for the address";
            return -1;
        }
    }
    c.bits = (uint8_t)bits;
    for (unsigned i = 0; i < 16; i++) {
        unsigned keep = bits >= 8 * (i + 1) ? 8 : bits > 8 * i ? bits - 8 * i : 0;
        uint8_t mask = keep ? (uint8_t)(0xff << (8 - keep)) : 0;
        if (c.net.bytes[i] & (uint8_t)~mask) {
            *why = "host bits set below the prefix length";
            return -1;
        }
    }
    *ret = c;
    return 0;
}

bool api_cidr_match(const api_cidr_t *ranges, size_t n, const api_addr_t *a)
{
    for (size_t r = 0; r < n; r++) {
        const api_cidr_t *c = &ranges[r];
        if (c->net.family != a->family)
            continue;
        unsigned bits = c->bits, i = 0;
        bool ok = true;
        for (; bits >= 8 && ok; i++, bits -= 8)
            ok = a->bytes[i] == c->net.bytes[i];
        if (ok && bits)
            ok = (a->bytes[i] & (uint8_t)(0xff << (8 - bits))) == c->net.bytes[i];
        if (ok)
            return true;
    }
    return false;
}

void api_addr_format(const api_addr_t *a, char *out, size_t outlen)
{
    if (!inet_ntop(a->family == 4 ? AF_INET : AF_INET6, a->bytes, out, (socklen_t)outlen) && outlen)
        out[0] = '\0';
}

/*
 * url.c - DATABASE_URL parsing (see sync.h). Strict: anything we do not
 * understand is an error that names the part, never the password.
 */
#include <ctype.h>
#include <stdbool.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sync.h"

#define URL_MAX 4096

static void errf(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void errf(char *err, size_t errlen, const char *fmt, ...)
{
    if (!err || !errlen)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

static int hexval(int c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    c = tolower(c);
    return c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

/* Percent-decode [p, p+n) into a new string; NULL on a bad escape or NUL. */
static char *decode(const char *p, size_t n)
{
    char *out = malloc(n + 1);
    if (!out)
        return NULL;
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        if (p[i] == '%') {
            if (i + 2 >= n || hexval(p[i + 1]) < 0 || hexval(p[i + 2]) < 0) {
                free(out);
                return NULL;
            }
            int v = hexval(p[i + 1]) * 16 + hexval(p[i + 2]);
            if (v == 0) {
                free(out);
                return NULL;
            }
            out[o++] = (char)v;
            i += 2;
        } else {
            out[o++] = p[i];
        }
    }
    out[o] = 0;
    return out;
}

static int parse_uint(const char *p, size_t n, unsigned lo, unsigned hi, unsigned *out)
{
    if (n == 0 || n > 9)
        return -1;
    unsigned v = 0;
    for (size_t i = 0; i < n; i++) {
        if (p[i] < '0' || p[i] > '9')
            return -1;
        v = v * 10 + (unsigned)(p[i] - '0');
    }
    if (v < lo || v > hi)
        return -1;
    *out = v;
    return 0;
}

static int dup_field(char **dst, const char *src)
{
    *dst = src ? strdup(src) : NULL;
    return src && !*dst ? -1 : 0;
}

int sync_url_copy(sync_url_t *dst, const sync_url_t *src)
{
    *dst = *src;
    dst->user = dst->password = dst->host = dst->db = dst->socket = dst->tls_ca = NULL;
    if (dup_field(&dst->user, src->user) || dup_field(&dst->password, src->password) ||
        dup_field(&dst->host, src->host) || dup_field(&dst->db, src->db) ||
        dup_field(&dst->socket, src->socket) || dup_field(&dst->tls_ca, src->tls_ca)) {
        sync_url_free(dst);
        return SYNC_ENOMEM;
    }
    return 0;
}

void sync_url_free(sync_url_t *u)
{
    if (!u)
        return;
    free(u->user);
    free(u->password);
    free(u->host);
    free(u->db);
    free(u->socket);
    free(u->tls_ca);
    memset(u, 0, sizeof(*u));
}

static int parse_option(sync_url_t *u, const char *p, size_t n, char *err, size_t errlen)
{
    const char *eq = memchr(p, '=', n);
    if (!eq) {
        errf(err, errlen, "DATABASE_URL option without '=': '%.*s'", (int)(n > 40 ? 40 : n), p);
        return -1;
    }
    size_t kn = (size_t)(eq - p), vn = n - kn - 1;
    const char *v = eq + 1;
    unsigned x;
#define KEY(s) (kn == sizeof(s) - 1 && memcmp(p, s, kn) == 0)
    if (KEY("socket")) {
        free(u->socket);
        u->socket = decode(v, vn);
        if (!u->socket || !u->socket[0] || u->socket[0] != '/') {
            errf(err, errlen, "DATABASE_URL socket= must be an absolute path");
            return -1;
        }
    } else if (KEY("connect_timeout") || KEY("read_timeout") || KEY("write_timeout")) {
        if (parse_uint(v, vn, 1, 3600, &x) != 0) {
            errf(err, errlen, "DATABASE_URL %.*s must be 1..3600 seconds", (int)kn, p);
            return -1;
        }
        if (KEY("connect_timeout"))
            u->connect_timeout_s = x;
        else if (KEY("read_timeout"))
            u->read_timeout_s = x;
        else
            u->write_timeout_s = x;
    } else if (KEY("tls")) {
        if (parse_uint(v, vn, 0, 1, &x) != 0) {
            errf(err, errlen, "DATABASE_URL tls must be 0 or 1");
            return -1;
        }
        u->tls = (int)x;
    } else if (KEY("tls_ca")) {
        free(u->tls_ca);
        u->tls_ca = decode(v, vn);
        if (!u->tls_ca || u->tls_ca[0] != '/') {
            errf(err, errlen, "DATABASE_URL tls_ca= must be an absolute path");
            return -1;
        }
    } else {
        errf(err, errlen, "DATABASE_URL: unknown option '%.*s'", (int)(kn > 40 ? 40 : kn), p);
        return -1;
    }
#undef KEY
    return 0;
}

int sync_url_parse(const char *url, sync_url_t *out, char *err, size_t errlen)
{
    static const char scheme[] = "mysql://";
    sync_url_t u = {
        .port = 3306, .connect_timeout_s = 5, .read_timeout_s = 30, .write_timeout_s = 30};
    if (err && errlen)
        err[0] = 0;
    size_t len = url ? strnlen(url, URL_MAX + 1) : 0;
    if (!url || len == 0 || len > URL_MAX) {
        errf(err, errlen, "DATABASE_URL is empty or longer than %d bytes", URL_MAX);
        return -1;
    }
    for (size_t i = 0; i < len; i++) {
        if ((unsigned char)url[i] <= ' ' || (unsigned char)url[i] >= 0x7f) {
            errf(err, errlen, "DATABASE_URL contains a space or a non-ASCII byte");
            return -1;
        }
    }
    if (strncmp(url, scheme, sizeof(scheme) - 1) != 0) {
        errf(err, errlen, "DATABASE_URL must start with mysql://");
        return -1;
    }
    const char *p = url + sizeof(scheme) - 1, *end = url + len;
    const char *at = memchr(p, '@', (size_t)(end - p));
    const char *slash = memchr(p, '/', (size_t)(end - p));
    if (!at || (slash && slash < at)) {
        errf(err, errlen, "DATABASE_URL needs USER@ before the host");
        return -1;
    }
    /* userinfo: the password may contain ':' only percent-encoded */
    const char *colon = memchr(p, ':', (size_t)(at - p));
    u.user = decode(p, (size_t)((colon ? colon : at) - p));
    u.password = colon ? decode(colon + 1, (size_t)(at - colon - 1)) : strdup("");
    if (!u.user || !u.user[0] || !u.password) {
        errf(err, errlen, "DATABASE_URL: bad user or password (empty user, or a bad %%-escape)");
        goto fail;
    }
    p = at + 1;
    slash = memchr(p, '/', (size_t)(end - p));
    if (!slash) {
        errf(err, errlen, "DATABASE_URL needs /DATABASE after the host");
        goto fail;
    }
    const char *hstart = p, *hend, *after;
    if (*p == '[') { /* [IPv6] */
        const char *rb = memchr(p, ']', (size_t)(slash - p));
        if (!rb || rb == p + 1) {
            errf(err, errlen, "DATABASE_URL: bad [IPv6] host");
            goto fail;
        }
        hstart = p + 1;
        hend = rb;
        after = rb + 1;
        if (after != slash && *after != ':') {
            errf(err, errlen, "DATABASE_URL: bad [IPv6] host");
            goto fail;
        }
    } else {
        const char *c = memchr(p, ':', (size_t)(slash - p));
        hend = c ? c : slash;
        after = hend;
    }
    const char *hcolon = after < slash && *after == ':' ? after : NULL;
    if (hend == hstart || (size_t)(hend - hstart) > 255) {
        errf(err, errlen, "DATABASE_URL: empty or too long host");
        goto fail;
    }
    for (const char *h = hstart; h < hend; h++) {
        bool ok = isalnum((unsigned char)*h) || *h == '.' || *h == '-' || *h == '_' ||
                  (hstart != p && *h == ':');
        if (!ok) {
            errf(err, errlen, "DATABASE_URL: bad character in the host");
            goto fail;
        }
    }
    u.host = strndup(hstart, (size_t)(hend - hstart));
    if (!u.host)
        goto fail;
    if (hcolon && parse_uint(hcolon + 1, (size_t)(slash - hcolon - 1), 1, 65535, &u.port) != 0) {
        errf(err, errlen, "DATABASE_URL: the port must be 1..65535");
        goto fail;
    }
    p = slash + 1;
    const char *q = memchr(p, '?', (size_t)(end - p));
    const char *dend = q ? q : end;
    if (dend == p || (size_t)(dend - p) > 64) {
        errf(err, errlen, "DATABASE_URL: empty or too long database name");
        goto fail;
    }
    for (const char *d = p; d < dend; d++) {
        if (!isalnum((unsigned char)*d) && *d != '_' && *d != '$') {
            errf(err, errlen, "DATABASE_URL: the database name may hold [A-Za-z0-9_$] only");
            goto fail;
        }
    }
    u.db = strndup(p, (size_t)(dend - p));
    if (!u.db)
        goto fail;
    if (q) {
        p = q + 1;
        while (p < end) {
            const char *amp = memchr(p, '&', (size_t)(end - p));
            const char *oend = amp ? amp : end;
            if (parse_option(&u, p, (size_t)(oend - p), err, errlen) != 0)
                goto fail;
            p = amp ? amp + 1 : end;
        }
    }
    if (u.tls_ca)
        u.tls = 1; /* verifying the server is TLS */
    *out = u;
    return 0;
fail:
    if (err && errlen && !err[0])
        errf(err, errlen, "DATABASE_URL: out of memory");
    sync_url_free(&u);
    return -1;
}

/*
 * common.c - what sync.c, cold.c and tools.c share: connecting to MySQL
 * with the URL's options, and building SQL text (sync_internal.h).
 */
#include <mysql.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sync.h"
#include "sync_internal.h"

void sync_errf(char *err, size_t errlen, const char *fmt, ...)
{
    if (!err || !errlen)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

MYSQL *sync_mysql_connect(const sync_url_t *u, char *err, size_t errlen)
{
    MYSQL *m = mysql_init(NULL);
    if (!m) {
        sync_errf(err, errlen, "mysql_init: out of memory");
        return NULL;
    }
    unsigned ct = u->connect_timeout_s, rt = u->read_timeout_s, wt = u->write_timeout_s;
    mysql_options(m, MYSQL_OPT_CONNECT_TIMEOUT, &ct);
    mysql_options(m, MYSQL_OPT_READ_TIMEOUT, &rt);
    mysql_options(m, MYSQL_OPT_WRITE_TIMEOUT, &wt);
    mysql_options(m, MYSQL_SET_CHARSET_NAME, "utf8mb4");
    if (u->tls) {
        my_bool on = 1;
        mysql_optionsv(m, MYSQL_OPT_SSL_ENFORCE, &on);
    }
    if (u->tls_ca) {
        /* Trust only these CAs, and check the certificate names the host. */
        my_bool on = 1;
        mysql_optionsv(m, MYSQL_OPT_SSL_CA, u->tls_ca);
        mysql_optionsv(m, MYSQL_OPT_SSL_VERIFY_SERVER_CERT, &on);
    }
    if (!mysql_real_connect(m, u->socket ? "localhost" : u->host, u->user, u->password, u->db,
                            u->socket ? 0 : u->port, u->socket, 0)) {
        sync_errf(err, errlen, "cannot connect to MySQL at %s:%u/%s as %s: %s",
                  u->socket ? u->socket : u->host, u->socket ? 0 : u->port, u->db, u->user,
                  mysql_error(m));
        mysql_close(m);
        return NULL;
    }
    return m;
}

static bool sb_reserve(sync_sqlbuf_t *b, size_t extra)
{
    if (b->oom)
        return false;
    if (b->len + extra + 1 <= b->cap)
        return true;
    size_t cap = b->cap ? b->cap : 1u << 16;
    while (cap < b->len + extra + 1)
        cap *= 2;
    char *n = realloc(b->p, cap);
    if (!n) {
        b->oom = true;
        return false;
    }
    b->p = n;
    b->cap = cap;
    return true;
}

void sync_sb_reset(sync_sqlbuf_t *b)
{
    b->len = 0;
    b->oom = false;
    if (b->p)
        b->p[0] = 0;
}

void sync_sb_free(sync_sqlbuf_t *b)
{
    free(b->p);
    memset(b, 0, sizeof(*b));
}

void sync_sb_add(sync_sqlbuf_t *b, const char *s, size_t n)
{
    if (!sb_reserve(b, n))
        return;
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = 0;
}

void sync_sb_adds(sync_sqlbuf_t *b, const char *s)
{
    sync_sb_add(b, s, strlen(s));
}

void sync_sb_addf(sync_sqlbuf_t *b, const char *fmt, ...)
{
    char buf[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    if (n > 0)
        sync_sb_add(b, buf, (size_t)n < sizeof(buf) ? (size_t)n : sizeof(buf) - 1);
}

void sync_sb_hex(sync_sqlbuf_t *b, const void *p, size_t n)
{
    if (n == 0) {
        sync_sb_adds(b, "''");
        return;
    }
    if (!sb_reserve(b, 2 * n + 3))
        return;
    b->p[b->len++] = 'X';
    b->p[b->len++] = '\'';
    b->len += mysql_hex_string(b->p + b->len, p, (unsigned long)n);
    b->p[b->len++] = '\'';
    b->p[b->len] = 0;
}

/* sync_internal.h - shared inside sync/ only. */
#ifndef ARQ_SYNC_INTERNAL_H
#define ARQ_SYNC_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>

typedef struct sync_migration {
    int version;
    const char *name;
    const char *sql;
    size_t len;
} sync_migration_t;

extern const sync_migration_t sync_migrations[];
extern const size_t sync_n_migrations;

/* ---- shared by sync.c, cold.c and tools.c (common.c) ------------------- */

struct st_mysql;
struct sync_url;

/* printf into err[errlen] (no-op when err is NULL). */
void sync_errf(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Connect with the URL's timeouts, TLS and utf8mb4; NULL with a reason in
 * err (never the password). */
struct st_mysql *sync_mysql_connect(const struct sync_url *u, char *err, size_t errlen);

/* SQL text being built: binary values go in as hex literals (X'..').
 * Errors are sticky (oom); sync_sb_reset empties it for reuse. */
typedef struct sync_sqlbuf {
    char *p;
    size_t len, cap;
    bool oom;
} sync_sqlbuf_t;
void sync_sb_reset(sync_sqlbuf_t *b);
void sync_sb_free(sync_sqlbuf_t *b);
void sync_sb_add(sync_sqlbuf_t *b, const char *s, size_t n);
void sync_sb_adds(sync_sqlbuf_t *b, const char *s);
void sync_sb_addf(sync_sqlbuf_t *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void sync_sb_hex(sync_sqlbuf_t *b, const void *p, size_t n);

#endif

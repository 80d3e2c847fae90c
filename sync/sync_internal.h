/* sync_internal.h - shared inside sync/ only. */
#ifndef ARQ_SYNC_INTERNAL_H
#define ARQ_SYNC_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

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

/* ---- the lease (lease.c; sync.c's fence) ------------------------------ */

/* The MySQL server's clock in unix microseconds (UTC: no time zone, no DST). */
#define SYNC_NOW_US "TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6))"
/* Which server a connection id belongs to. */
#define SYNC_CONN_SERVER "CONCAT(@@hostname, ':', @@port)"

/* The statement that renews the lease at generation for owner (hex-quoted
 * into b) and names this connection and wal_id (< 0: leave it); affects one
 * row exactly when the lease is still ours. */
void sync_lease_sql(sync_sqlbuf_t *b, const char *owner, uint64_t generation, uint32_t lease_ms,
                    int64_t wal_id);

#endif

/*
 * lease.c - the lease row (arq_lease) that makes one arqd at a time the
 * owner of a database, and its generation, the fencing token every write of
 * the drain carries (sync.h, docs/ha.md "Lease and fencing").
 *
 * Time is the MySQL server's clock (SYNC_NOW_US), never ours: two arqd on
 * two machines compare expiry against one clock. On Galera each node has its
 * own clock; they must be in sync to well within the lease (NTP).
 */
#include <inttypes.h>
#include <mysql.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>

#include "sync.h"
#include "sync_internal.h"

struct sync_lease {
    sync_url_t url;
    char owner[256];
    uint32_t lease_ms;
    MYSQL *m;
    sync_sqlbuf_t sb;
};

static int64_t wall_us(void)
{
    struct timeval tv;
    gettimeofday(&tv, NULL);
    return (int64_t)tv.tv_sec * 1000000 + tv.tv_usec;
}

void sync_lease_sql(sync_sqlbuf_t *b, const char *owner, uint64_t generation, uint32_t lease_ms,
                    int64_t wal_id)
{
    sync_sb_addf(b,
                 "UPDATE arq_lease SET expires_us = " SYNC_NOW_US " + %" PRIu64
                 ", conn_id = CONNECTION_ID(), conn_server = " SYNC_CONN_SERVER
                 ", updated_us = %" PRId64,
                 (uint64_t)lease_ms * 1000, wall_us());
    if (wal_id >= 0)
        sync_sb_addf(b, ", wal_id = %" PRId64, wal_id);
    sync_sb_addf(b, " WHERE id = 1 AND generation = %" PRIu64 " AND owner = ", generation);
    sync_sb_hex(b, owner, strlen(owner));
}

int sync_lease_open(const sync_url_t *u, const char *owner, uint32_t lease_ms, sync_lease_t **ret)
{
    sync_lease_t *l = calloc(1, sizeof(*l));
    if (!l || strlen(owner) >= sizeof(l->owner) || sync_url_copy(&l->url, u) != 0) {
        free(l);
        return SYNC_ENOMEM;
    }
    snprintf(l->owner, sizeof(l->owner), "%s", owner);
    l->lease_ms = lease_ms;
    *ret = l;
    return SYNC_OK;
}

void sync_lease_close(sync_lease_t *l)
{
    if (!l)
        return;
    if (l->m)
        mysql_close(l->m);
    sync_sb_free(&l->sb);
    sync_url_free(&l->url);
    free(l);
}

static int fail(sync_lease_t *l, char *err, size_t errlen)
{
    sync_errf(err, errlen, "MySQL error %u: %s", mysql_errno(l->m), mysql_error(l->m));
    mysql_close(l->m);
    l->m = NULL;
    return SYNC_ESQL;
}

static int conn(sync_lease_t *l, char *err, size_t errlen)
{
    if (l->m)
        return SYNC_OK;
    l->m = sync_mysql_connect(&l->url, err, errlen);
    if (!l->m)
        return SYNC_ECONNECT;
    /* a paused owner's row lock must not hold us past a lease */
    char q[96];
    snprintf(q, sizeof(q), "SET SESSION innodb_lock_wait_timeout = %u",
             l->lease_ms / 1000 ? l->lease_ms / 1000 : 1);
    if (mysql_query(l->m, q))
        return fail(l, err, errlen);
    return SYNC_OK;
}

/* The row, plus the old owner's connection and whether it is on our server. */
static int read_row(sync_lease_t *l, sync_lease_row_t *row, uint64_t *conn_id, int *same_server,
                    char *err, size_t errlen)
{
    int rc = conn(l, err, errlen);
    if (rc)
        return rc;
    if (mysql_query(l->m, "SELECT owner, generation, expires_us, " SYNC_NOW_US
                          ", wal_id, handoff, conn_id, conn_server = " SYNC_CONN_SERVER
                          " AND conn_id <> CONNECTION_ID() FROM arq_lease WHERE id = 1"))
        return fail(l, err, errlen);
    MYSQL_RES *r = mysql_store_result(l->m);
    if (!r)
        return fail(l, err, errlen);
    MYSQL_ROW f = mysql_fetch_row(r);
    unsigned long *len = f ? mysql_fetch_lengths(r) : NULL;
    if (!f || !len || !f[1] || !f[2] || !f[3] || !f[4] || !f[5] || !f[6] || !f[7]) {
        mysql_free_result(r);
        sync_errf(err, errlen, "arq_lease has no row 1 (migration 0002_lease not applied?)");
        return SYNC_ESCHEMA;
    }
    memset(row, 0, sizeof(*row));
    size_t n = len[0] < sizeof(row->owner) - 1 ? len[0] : sizeof(row->owner) - 1;
    memcpy(row->owner, f[0], n);
    row->generation = strtoull(f[1], NULL, 10);
    row->expires_us = strtoll(f[2], NULL, 10);
    row->now_us = strtoll(f[3], NULL, 10);
    row->wal_id = strtoll(f[4], NULL, 10);
    row->handoff = atoi(f[5]);
    if (conn_id)
        *conn_id = strtoull(f[6], NULL, 10);
    if (same_server) /* and not this connection (the same node again) */
        *same_server = atoi(f[7]) == 1;
    mysql_free_result(r);
    return SYNC_OK;
}

int sync_lease_read(sync_lease_t *l, sync_lease_row_t *row, char *err, size_t errlen)
{
    return read_row(l, row, NULL, NULL, err, errlen);
}

int sync_lease_try(sync_lease_t *l, sync_lease_row_t *before, uint64_t *ret_generation, char *err,
                   size_t errlen)
{
    uint64_t old_conn = 0;
    int same_server = 0;
    int rc = read_row(l, before, &old_conn, &same_server, err, errlen);
    if (rc)
        return rc;
    bool mine = strcmp(before->owner, l->owner) == 0;
    if (!mine && before->expires_us > before->now_us) {
        sync_errf(err, errlen,
                  "the lease is held by '%s' (generation %" PRIu64 ") for %" PRId64 " ms more",
                  before->owner, before->generation, (before->expires_us - before->now_us) / 1000);
        return SYNC_EBUSY;
    }
    if (old_conn && same_server && before->owner[0]) {
        /* A paused old owner may hold the lease row's lock in an open
         * transaction: end it (its transaction rolls back). An id of
         * another server, or one already gone, is not an error. */
        char q[64];
        snprintf(q, sizeof(q), "KILL CONNECTION %" PRIu64, old_conn);
        (void)mysql_query(l->m, q);
    }
    sync_sb_reset(&l->sb);
    sync_sb_addf(&l->sb, "UPDATE arq_lease SET generation = generation + 1, handoff = 0, owner = ");
    sync_sb_hex(&l->sb, l->owner, strlen(l->owner));
    sync_sb_addf(&l->sb,
                 ", expires_us = " SYNC_NOW_US " + %" PRIu64
                 ", conn_id = CONNECTION_ID(), conn_server = " SYNC_CONN_SERVER
                 ", updated_us = %" PRId64 " WHERE id = 1 AND generation = %" PRIu64,
                 (uint64_t)l->lease_ms * 1000, wall_us(), before->generation);
    if (l->sb.oom)
        return SYNC_ENOMEM;
    if (mysql_real_query(l->m, l->sb.p, (unsigned long)l->sb.len))
        return fail(l, err, errlen);
    if (mysql_affected_rows(l->m) != 1) {
        sync_errf(err, errlen, "another node took the lease at the same moment");
        return SYNC_EBUSY;
    }
    *ret_generation = before->generation + 1;
    return SYNC_OK;
}

int sync_lease_renew(sync_lease_t *l, uint64_t generation, char *err, size_t errlen)
{
    int rc = conn(l, err, errlen);
    if (rc)
        return rc;
    sync_sb_reset(&l->sb);
    sync_lease_sql(&l->sb, l->owner, generation, l->lease_ms, -1);
    if (l->sb.oom)
        return SYNC_ENOMEM;
    if (mysql_real_query(l->m, l->sb.p, (unsigned long)l->sb.len))
        return fail(l, err, errlen);
    if (mysql_affected_rows(l->m) != 1) {
        sync_errf(err, errlen, "the lease (generation %" PRIu64 ") was taken by another node",
                  generation);
        return SYNC_EFENCED;
    }
    return SYNC_OK;
}

int sync_lease_request_handoff(const sync_url_t *u, sync_lease_row_t *row, char *err, size_t errlen)
{
    sync_lease_t *l;
    if (sync_lease_open(u, "", 1000, &l) != SYNC_OK)
        return SYNC_ENOMEM;
    int rc = read_row(l, row, NULL, NULL, err, errlen);
    if (!rc && (!row->owner[0] || row->expires_us <= row->now_us)) {
        sync_errf(err, errlen, "no node holds the lease now (owner '%s', generation %" PRIu64 ")",
                  row->owner, row->generation);
        rc = SYNC_EBUSY;
    }
    if (!rc) {
        char q[160];
        snprintf(q, sizeof(q),
                 "UPDATE arq_lease SET handoff = 1 WHERE id = 1 AND generation = %" PRIu64,
                 row->generation);
        if (mysql_query(l->m, q))
            rc = fail(l, err, errlen);
        else if (mysql_affected_rows(l->m) != 1 && !row->handoff) {
            sync_errf(err, errlen, "the lease changed hands meanwhile: try again");
            rc = SYNC_EBUSY;
        }
    }
    sync_lease_close(l);
    return rc;
}

/*
 * sync.c - migrations and the drain thread (see sync.h).
 */
#include "sync.h"

#include <errno.h>
#include <inttypes.h>
#include <mysql.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <xxhash.h>

#include "sync_internal.h"

const uint64_t sync_batch_bounds[SYNC_HIST_BUCKETS - 1] = {1, 10, 100, 500, 1000, 5000, 10000};

static int64_t wall_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* ---- connections ------------------------------------------------------- */

static int db_exec(MYSQL *m, const char *sql, size_t len, char *err, size_t errlen)
{
    if (mysql_real_query(m, sql, (unsigned long)len) != 0) {
        sync_errf(err, errlen, "MySQL error %u: %s", mysql_errno(m), mysql_error(m));
        return SYNC_ESQL;
    }
    MYSQL_RES *r = mysql_store_result(m);
    if (r)
        mysql_free_result(r);
    return 0;
}

static int db_execs(MYSQL *m, const char *sql, char *err, size_t errlen)
{
    return db_exec(m, sql, strlen(sql), err, errlen);
}

/* ---- migrations -------------------------------------------------------- */

static void checksum_hex(const sync_migration_t *mg, char out[17])
{
    snprintf(out, 17, "%016" PRIx64, (uint64_t)XXH3_64bits(mg->sql, mg->len));
}

/* Run a migration's statements: split at ';' that ends a line. */
static int run_statements(MYSQL *m, const sync_migration_t *mg, char *err, size_t errlen)
{
    const char *p = mg->sql, *end = mg->sql + mg->len;
    while (p < end) {
        const char *q = p;
        while (q < end && !(*q == ';' && (q + 1 == end || q[1] == '\n')))
            q++;
        /* skip chunks of only whitespace and -- comments */
        bool empty = true;
        for (const char *c = p; c < q && empty;) {
            if (*c == '-' && c + 1 < q && c[1] == '-') {
                while (c < q && *c != '\n')
                    c++;
            } else if (*c == ' ' || *c == '\n' || *c == '\t' || *c == '\r') {
                c++;
            } else {
                empty = false;
            }
        }
        if (!empty) {
            int rc = db_exec(m, p, (size_t)(q - p), err, errlen);
            if (rc) {
                size_t n = strlen(err);
                sync_errf(err + n, errlen - n, " (migration %04d_%s)", mg->version, mg->name);
                return rc;
            }
        }
        p = q < end ? q + 1 : end;
    }
    return 0;
}

static int migrate_locked(MYSQL *m, int *applied, char *err, size_t errlen)
{
    int rc = db_execs(m,
                      "CREATE TABLE IF NOT EXISTS arq_schema_migrations ("
                      " version INT UNSIGNED NOT NULL PRIMARY KEY,"
                      " name VARCHAR(64) NOT NULL, checksum CHAR(16) NOT NULL,"
                      " applied_us BIGINT NOT NULL) ENGINE=InnoDB",
                      err, errlen);
    if (rc)
        return rc;
    if (mysql_query(m,
                    "SELECT version, name, checksum FROM arq_schema_migrations ORDER BY version")) {
        sync_errf(err, errlen, "MySQL error %u: %s", mysql_errno(m), mysql_error(m));
        return SYNC_ESQL;
    }
    MYSQL_RES *res = mysql_store_result(m);
    if (!res) {
        sync_errf(err, errlen, "MySQL error %u: %s", mysql_errno(m), mysql_error(m));
        return SYNC_ESQL;
    }
    size_t done = 0;
    MYSQL_ROW row;
    rc = 0;
    while ((row = mysql_fetch_row(res)) && !rc) {
        unsigned long v = strtoul(row[0] ? row[0] : "0", NULL, 10);
        if (v == 0 || v > sync_n_migrations) {
            sync_errf(err, errlen,
                      "the database schema is newer than this arqd: migration %lu (%s) is applied, "
                      "this build knows up to %zu; upgrade arqd or use another database",
                      v, row[1] ? row[1] : "?", sync_n_migrations);
            rc = SYNC_ESCHEMA;
            break;
        }
        const sync_migration_t *mg = &sync_migrations[v - 1];
        char sum[17];
        checksum_hex(mg, sum);
        if (!row[2] || strcmp(row[2], sum) != 0) {
            sync_errf(err, errlen,
                      "migration %04d_%s was changed after it was applied (checksum %s in the "
                      "database, %s in this build): refusing to run",
                      mg->version, mg->name, row[2] ? row[2] : "NULL", sum);
            rc = SYNC_ESCHEMA;
            break;
        }
        if (v != done + 1) {
            sync_errf(err, errlen, "arq_schema_migrations has a hole before migration %lu", v);
            rc = SYNC_ESCHEMA;
            break;
        }
        done = v;
    }
    mysql_free_result(res);
    if (rc)
        return rc;
    for (size_t i = done; i < sync_n_migrations; i++) {
        const sync_migration_t *mg = &sync_migrations[i];
        rc = run_statements(m, mg, err, errlen);
        if (rc)
            return rc;
        char sum[17], sql[256];
        checksum_hex(mg, sum);
        snprintf(sql, sizeof(sql),
                 "INSERT INTO arq_schema_migrations (version, name, checksum, applied_us) "
                 "VALUES (%d, '%s', '%s', %" PRId64 ")",
                 mg->version, mg->name, sum, wall_us());
        rc = db_execs(m, sql, err, errlen);
        if (rc)
            return rc;
        if (applied)
            (*applied)++;
    }
    return 0;
}

static int migrate_conn(MYSQL *m, int *applied, char *err, size_t errlen)
{
    if (applied)
        *applied = 0;
    /* One arqd migrates at a time. */
    if (mysql_query(m, "SELECT GET_LOCK('arq_migrate', 30)") != 0) {
        sync_errf(err, errlen, "MySQL error %u: %s", mysql_errno(m), mysql_error(m));
        return SYNC_ESQL;
    }
    MYSQL_RES *r = mysql_store_result(m);
    MYSQL_ROW row = r ? mysql_fetch_row(r) : NULL;
    bool locked = row && row[0] && strcmp(row[0], "1") == 0;
    if (r)
        mysql_free_result(r);
    if (!locked) {
        sync_errf(err, errlen, "could not take the migration lock (another arqd migrating?)");
        return SYNC_ESQL;
    }
    int rc = migrate_locked(m, applied, err, errlen);
    char e2[8];
    (void)db_execs(m, "SELECT RELEASE_LOCK('arq_migrate')", e2, sizeof(e2));
    return rc;
}

int sync_migrate(const sync_url_t *u, int *applied, char *err, size_t errlen)
{
    MYSQL *m = sync_mysql_connect(u, err, errlen);
    if (!m)
        return SYNC_ECONNECT;
    int rc = migrate_conn(m, applied, err, errlen);
    mysql_close(m);
    return rc;
}

/* ---- the drain thread -------------------------------------------------- */

struct sync {
    wal_t *wal;
    sync_options_t o;
    sync_url_t url;
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cond;
    bool stop;
    bool kicked; /* sync_kick since the last wait (under mu) */
    /* The watermark this connection committed last: the next batch needs no
     * SELECT for it (its UPDATE checks it all the same). Reset per connection. */
    bool wm_known;
    uint64_t wm_last;
    sync_stats_t st; /* under mu */
    /* switchover (sync_release), under mu */
    bool release_req, released;
    int release_rc;
    /* thread-private */
    char *owner;           /* lease owner (o.lease_ms > 0) */
    int64_t wal_id;        /* this WAL's created_us, written into the lease */
    int64_t next_renew_us; /* the idle renewal */
    sync_sqlbuf_t fb;      /* the fence statement */
    MYSQL *m;
    sync_sqlbuf_t sb; /* SQL text being built */
    int sql_err;      /* out of memory outside sb (the batch arrays, names) */
    uint64_t batch_rows, batch_first_seq, batch_last_seq;
    int64_t oldest_unsynced_ts;
    char **known; /* open-addressing set of names already in arq_streams */
    size_t known_cap, n_known;
    char **pending; /* names of this batch not yet known */
    size_t n_pending, cap_pending;
    int64_t cursor_hwm_us;  /* newest cursor update already synced */
    int64_t session_hwm_us; /* newest session write already synced */
    int64_t next_cursor_us;
    int64_t next_cursor_gc_us;
    int64_t next_retain_us;
    /* the batch, column by column (bulk binding), bytes in `arena` */
    MYSQL_STMT *ins; /* prepared INSERT, array-bound (MariaDB) */
    bool no_bulk;    /* server without bulk operations (MySQL): text INSERT */
    struct col {
        size_t stream, producer, msgid, headers, payload; /* offsets into arena */
        unsigned long stream_len, producer_len, msgid_len, headers_len, payload_len;
        uint64_t offset, seq, checksum;
        int64_t ts_us;
        unsigned char direction;
    } * rows;
    size_t rows_cap;
    uint8_t *arena;
    size_t arena_len, arena_cap;
};

/* Out of memory while building a batch or a statement. */
static int build_err(const sync_t *s)
{
    return s->sql_err ? s->sql_err : s->sb.oom ? SYNC_ENOMEM : 0;
}

const char *sync_state_name(enum sync_state st)
{
    switch (st) {
    case SYNC_STATE_OK:
        return "ok";
    case SYNC_STATE_DEGRADED:
        return "degraded";
    case SYNC_STATE_FAILED:
        return "failed";
    case SYNC_STATE_FENCED:
        return "fenced";
    default:
        return "connecting";
    }
}

static void progress(sync_t *s)
{
    if (s->o.on_progress)
        s->o.on_progress(s->o.progress_arg);
}

static void set_state(sync_t *s, enum sync_state st, const char *why)
{
    pthread_mutex_lock(&s->mu);
    bool changed = s->st.state != st;
    s->st.state = st;
    if (st == SYNC_STATE_OK && !why)
        s->st.last_error[0] = '\0'; /* recovered: the error is history */
    if (why) {
        snprintf(s->st.last_error, sizeof(s->st.last_error), "%s", why);
        if (st != SYNC_STATE_OK)
            s->st.errors++;
    }
    pthread_mutex_unlock(&s->mu);
    if (changed)
        progress(s);
}

static uint64_t name_hash(const char *p, size_t n)
{
    return XXH3_64bits(p, n);
}

static bool stream_known(sync_t *s, const char *name, size_t len)
{
    if (!s->known_cap)
        return false;
    for (size_t i = name_hash(name, len) & (s->known_cap - 1);; i = (i + 1) & (s->known_cap - 1)) {
        const char *k = s->known[i];
        if (!k)
            return false;
        if (strlen(k) == len && memcmp(k, name, len) == 0)
            return true;
    }
}

static void known_insert(sync_t *s, char *name)
{
    if ((s->n_known + 1) * 2 > s->known_cap) {
        size_t cap = s->known_cap ? s->known_cap * 2 : 256;
        char **n = calloc(cap, sizeof(*n));
        if (!n) {
            free(name);
            return;
        }
        for (size_t i = 0; i < s->known_cap; i++) {
            if (!s->known[i])
                continue;
            size_t j = name_hash(s->known[i], strlen(s->known[i])) & (cap - 1);
            while (n[j])
                j = (j + 1) & (cap - 1);
            n[j] = s->known[i];
        }
        free(s->known);
        s->known = n;
        s->known_cap = cap;
    }
    size_t j = name_hash(name, strlen(name)) & (s->known_cap - 1);
    while (s->known[j])
        j = (j + 1) & (s->known_cap - 1);
    s->known[j] = name;
    s->n_known++;
}

static void streams_forget(sync_t *s)
{
    for (size_t i = 0; i < s->known_cap; i++) {
        free(s->known[i]);
        s->known[i] = NULL;
    }
    s->n_known = 0;
}

static void pending_clear(sync_t *s)
{
    for (size_t i = 0; i < s->n_pending; i++)
        free(s->pending[i]);
    s->n_pending = 0;
}

/* A stream of this batch that arq_streams may not hold yet. */
static void pending_add(sync_t *s, const char *name, size_t len)
{
    if (stream_known(s, name, len))
        return;
    for (size_t i = 0; i < s->n_pending; i++)
        if (strlen(s->pending[i]) == len && memcmp(s->pending[i], name, len) == 0)
            return;
    if (s->n_pending == s->cap_pending) {
        size_t cap = s->cap_pending ? s->cap_pending * 2 : 16;
        char **n = realloc(s->pending, cap * sizeof(*n));
        if (!n) {
            s->sql_err = SYNC_ENOMEM;
            return;
        }
        s->pending = n;
        s->cap_pending = cap;
    }
    char *c = strndup(name, len);
    if (!c) {
        s->sql_err = SYNC_ENOMEM;
        return;
    }
    s->pending[s->n_pending++] = c;
}

/* Copy n bytes into the batch arena; its offset, or SIZE_MAX. */
static size_t arena_add(sync_t *s, const void *p, size_t n)
{
    if (s->arena_len + n > s->arena_cap) {
        size_t cap = s->arena_cap ? s->arena_cap : 1u << 20;
        while (cap < s->arena_len + n)
            cap *= 2;
        uint8_t *a = realloc(s->arena, cap);
        if (!a) {
            s->sql_err = SYNC_ENOMEM;
            return SIZE_MAX;
        }
        s->arena = a;
        s->arena_cap = cap;
    }
    size_t off = s->arena_len;
    if (n)
        memcpy(s->arena + off, p, n);
    s->arena_len += n;
    return off;
}

/* One WAL record of the batch (valid only inside the read): copied. */
static int row_cb(const wal_record_t *rec, void *arg)
{
    sync_t *s = arg;
    if (s->batch_rows == 0) {
        s->batch_first_seq = rec->seq;
        s->oldest_unsynced_ts = rec->timestamp_us;
    }
    if (s->batch_rows == s->rows_cap) {
        size_t cap = s->rows_cap ? s->rows_cap * 2 : 1024;
        struct col *r = realloc(s->rows, cap * sizeof(*r));
        if (!r) {
            s->sql_err = SYNC_ENOMEM;
            return 1;
        }
        s->rows = r;
        s->rows_cap = cap;
    }
    struct col *c = &s->rows[s->batch_rows];
    c->stream = arena_add(s, rec->stream, rec->stream_len);
    c->producer = arena_add(s, rec->producer, rec->producer_len);
    c->msgid = arena_add(s, rec->msgid, rec->msgid_len);
    c->headers = arena_add(s, rec->headers, rec->headers_len);
    c->payload = arena_add(s, rec->payload, rec->payload_len);
    c->stream_len = (unsigned long)rec->stream_len;
    c->producer_len = (unsigned long)rec->producer_len;
    c->msgid_len = (unsigned long)rec->msgid_len;
    c->headers_len = (unsigned long)rec->headers_len;
    c->payload_len = (unsigned long)rec->payload_len;
    c->offset = rec->offset;
    c->seq = rec->seq;
    c->checksum = rec->checksum;
    c->ts_us = rec->timestamp_us;
    c->direction = rec->direction == WAL_DIR_OUT ? 1 : 0;
    pending_add(s, rec->stream, rec->stream_len);
    s->batch_rows++;
    s->batch_last_seq = rec->seq;
    return s->sql_err != 0;
}

/* The batch as one multi-row text INSERT (servers without bulk binding). */
static void sql_rows(sync_t *s)
{
    sync_sb_adds(&s->sb,
                 "INSERT INTO arq_messages (stream, `offset`, seq, direction, producer, msgid, "
                 "ts_us, headers, payload, checksum) VALUES ");
    for (size_t i = 0; i < s->batch_rows; i++) {
        const struct col *c = &s->rows[i];
        sync_sb_adds(&s->sb, i ? ",(" : "(");
        sync_sb_hex(&s->sb, s->arena + c->stream, c->stream_len);
        sync_sb_addf(&s->sb, ",%" PRIu64 ",%" PRIu64 ",%d,", c->offset, c->seq, c->direction);
        sync_sb_hex(&s->sb, s->arena + c->producer, c->producer_len);
        sync_sb_adds(&s->sb, ",");
        sync_sb_hex(&s->sb, s->arena + c->msgid, c->msgid_len);
        sync_sb_addf(&s->sb, ",%" PRId64 ",", c->ts_us);
        sync_sb_hex(&s->sb, s->arena + c->headers, c->headers_len);
        sync_sb_adds(&s->sb, ",");
        sync_sb_hex(&s->sb, s->arena + c->payload, c->payload_len);
        sync_sb_addf(&s->sb, ",%" PRIu64 ")", c->checksum);
    }
}

/* The batch through the prepared INSERT with array binding (MariaDB's bulk
 * execution: one round trip, no text to parse). Column-wise: one array per
 * column; for strings and blobs an array of pointers plus one of lengths,
 * filled in here, after the arena stopped moving. */
static int bulk_insert(sync_t *s, char *err, size_t errlen)
{
    size_t n = s->batch_rows;
    char **ptr = malloc(n * 5 * sizeof(*ptr));
    unsigned long *len = malloc(n * 5 * sizeof(*len));
    unsigned long long *u64 = malloc(n * 3 * sizeof(*u64));
    long long *ts = malloc(n * sizeof(*ts));
    unsigned char *dir = malloc(n);
    int rc = 0;
    if (!ptr || !len || !u64 || !ts || !dir) {
        rc = SYNC_ENOMEM;
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        const struct col *c = &s->rows[i];
        size_t offs[5] = {c->stream, c->producer, c->msgid, c->headers, c->payload};
        unsigned long lens[5] = {c->stream_len, c->producer_len, c->msgid_len, c->headers_len,
                                 c->payload_len};
        for (int k = 0; k < 5; k++) {
            ptr[k * n + i] = (char *)s->arena + offs[k];
            len[k * n + i] = lens[k];
        }
        u64[i] = c->offset;
        u64[n + i] = c->seq;
        u64[2 * n + i] = c->checksum;
        ts[i] = c->ts_us;
        dir[i] = c->direction;
    }
    /* columns: stream offset seq direction producer msgid ts_us headers payload checksum */
    MYSQL_BIND b[10];
    memset(b, 0, sizeof(b));
    static const int str_col[5] = {0, 4, 5, 7, 8};
    for (int k = 0; k < 5; k++) {
        b[str_col[k]].buffer_type = k == 0 ? MYSQL_TYPE_STRING : MYSQL_TYPE_BLOB;
        b[str_col[k]].buffer = &ptr[k * n];
        b[str_col[k]].length = &len[k * n];
    }
    b[1] = (MYSQL_BIND){.buffer_type = MYSQL_TYPE_LONGLONG, .buffer = &u64[0], .is_unsigned = 1};
    b[2] = (MYSQL_BIND){.buffer_type = MYSQL_TYPE_LONGLONG, .buffer = &u64[n], .is_unsigned = 1};
    b[9] =
        (MYSQL_BIND){.buffer_type = MYSQL_TYPE_LONGLONG, .buffer = &u64[2 * n], .is_unsigned = 1};
    b[3] = (MYSQL_BIND){.buffer_type = MYSQL_TYPE_TINY, .buffer = dir, .is_unsigned = 1};
    b[6] = (MYSQL_BIND){.buffer_type = MYSQL_TYPE_LONGLONG, .buffer = ts};
    unsigned int size = (unsigned int)n;
    if (mysql_stmt_attr_set(s->ins, STMT_ATTR_ARRAY_SIZE, &size) ||
        mysql_stmt_bind_param(s->ins, b) || mysql_stmt_execute(s->ins)) {
        sync_errf(err, errlen, "MySQL error %u: %s", mysql_stmt_errno(s->ins),
                  mysql_stmt_error(s->ins));
        rc = SYNC_ESQL;
    }
out:
    free(ptr);
    free(len);
    free(u64);
    free(ts);
    free(dir);
    return rc;
}

static void stmt_drop(sync_t *s)
{
    if (s->ins) {
        mysql_stmt_close(s->ins);
        s->ins = NULL;
    }
}

/* Prepare the bulk INSERT on a new connection, or settle for text. */
static void stmt_prepare(sync_t *s)
{
    static const char q[] = "INSERT INTO arq_messages (stream, `offset`, seq, direction, "
                            "producer, msgid, ts_us, headers, payload, checksum) "
                            "VALUES (?,?,?,?,?,?,?,?,?,?)";
    /* Bulk execution is MariaDB's (10.2+): a MySQL server says CLIENT_MYSQL
     * and has no MARIADB_CLIENT_STMT_BULK_OPERATIONS. */
    unsigned long caps = 0, ext = 0;
    bool bulk =
        mariadb_get_infov(s->m, MARIADB_CONNECTION_SERVER_CAPABILITIES, &caps) == 0 &&
        mariadb_get_infov(s->m, MARIADB_CONNECTION_EXTENDED_SERVER_CAPABILITIES, &ext) == 0 &&
        !(caps & CLIENT_MYSQL) && (ext & (MARIADB_CLIENT_STMT_BULK_OPERATIONS >> 32));
    s->ins = bulk ? mysql_stmt_init(s->m) : NULL;
    if (!s->ins || mysql_stmt_prepare(s->ins, q, sizeof(q) - 1) != 0) {
        stmt_drop(s);
        s->no_bulk = true;
    }
}

static void hist_add(uint64_t *b, uint64_t v)
{
    size_t i = 0;
    while (i < SYNC_HIST_BUCKETS - 1 && v > sync_batch_bounds[i])
        i++;
    b[i]++;
}

static int read_watermark(sync_t *s, uint64_t *wm, char *err, size_t errlen)
{
    if (mysql_query(s->m, "SELECT watermark_seq FROM arq_sync_state WHERE id = 1")) {
        sync_errf(err, errlen, "MySQL error %u: %s", mysql_errno(s->m), mysql_error(s->m));
        return SYNC_ESQL;
    }
    MYSQL_RES *r = mysql_store_result(s->m);
    MYSQL_ROW row = r ? mysql_fetch_row(r) : NULL;
    int rc = 0;
    if (!row || !row[0]) {
        sync_errf(err, errlen, "arq_sync_state has no watermark row");
        rc = SYNC_ESCHEMA;
    } else {
        *wm = strtoull(row[0], NULL, 10);
    }
    if (r)
        mysql_free_result(r);
    return rc;
}

/* INSERT IGNORE the batch's streams that arq_streams may not hold yet. */
static void sql_streams(sync_t *s)
{
    int n = 0;
    for (size_t i = 0; i < s->n_pending; i++) {
        wal_stream_info_t info;
        const char *name = s->pending[i];
        if (wal_stream_get(s->wal, name, strlen(name), &info) != 0)
            continue;
        sync_sb_adds(&s->sb,
                     n ? ","
                       : "INSERT IGNORE INTO arq_streams (name, id, epoch, created_us) VALUES ");
        sync_sb_adds(&s->sb, "(");
        sync_sb_hex(&s->sb, name, strlen(name));
        sync_sb_addf(&s->sb, ",%u,%" PRIu64 ",%" PRId64 ")", info.id, info.epoch, info.created_us);
        n++;
    }
}

/* drain_once: MySQL's watermark belongs to another WAL (not retried). */
#define DRAIN_FOREIGN (-100)
/* the lease is another node's now: this drain must never write again */
#define DRAIN_FENCED (-101)

/* The lease's UPDATE at our generation, in the transaction open on s->m (or
 * alone): 0 while the lease is ours, DRAIN_FENCED once it is not. */
static int fence(sync_t *s, char *err, size_t errlen)
{
    sync_sb_reset(&s->fb);
    sync_lease_sql(&s->fb, s->owner, s->o.lease_generation, s->o.lease_ms, s->wal_id);
    if (s->fb.oom)
        return SYNC_ENOMEM;
    int rc = db_exec(s->m, s->fb.p, s->fb.len, err, errlen);
    if (rc)
        return rc;
    if (mysql_affected_rows(s->m) != 1) {
        sync_errf(err, errlen,
                  "lost the lease: generation %" PRIu64 " of '%s' was taken over by another node; "
                  "this node stops writing",
                  s->o.lease_generation, s->owner);
        return DRAIN_FENCED;
    }
    pthread_mutex_lock(&s->mu);
    s->st.lease_renewals++;
    s->st.lease_renewed_us = wall_us();
    pthread_mutex_unlock(&s->mu);
    s->next_renew_us = wall_us() + (int64_t)s->o.lease_ms * 1000 / 3;
    return 0;
}

/* One write outside a batch (cursors): with a lease, in a transaction that
 * carries the fence, so that a replaced owner cannot change MySQL either.
 * *affected (nullable): the statement's affected rows. */
static int write_fenced(sync_t *s, const char *sql, size_t len, uint64_t *affected, char *err,
                        size_t errlen)
{
    if (!s->o.lease_ms) {
        int rc = db_exec(s->m, sql, len, err, errlen);
        if (!rc && affected)
            *affected = (uint64_t)mysql_affected_rows(s->m);
        return rc;
    }
    int rc = db_execs(s->m, "START TRANSACTION", err, errlen);
    if (!rc)
        rc = db_exec(s->m, sql, len, err, errlen);
    if (!rc && affected)
        *affected = (uint64_t)mysql_affected_rows(s->m);
    if (!rc)
        rc = fence(s, err, errlen);
    if (!rc && mysql_commit(s->m)) {
        sync_errf(err, errlen, "MySQL commit: error %u: %s", mysql_errno(s->m), mysql_error(s->m));
        rc = SYNC_ESQL;
    }
    if (rc)
        (void)mysql_rollback(s->m);
    return rc;
}

/* One batch after the watermark in one transaction. Returns rows written
 * (0: nothing to do), or a negative SYNC_E*. */
static int64_t drain_once(sync_t *s, char *err, size_t errlen)
{
    uint64_t wm = s->wm_last;
    int rc = s->wm_known ? 0 : read_watermark(s, &wm, err, errlen);
    if (rc)
        return rc;
    uint64_t acked_next = wal_acked_next_seq(s->wal);
    if (wm >= acked_next) {
        /* Sequences are this WAL's: a watermark past its end was written
         * from another WAL, and this one's records would never be copied. */
        sync_errf(err, errlen,
                  "MySQL's watermark (seq %" PRIu64 ") is past this WAL's end (next seq %" PRIu64
                  "): the database was filled from another WAL; give this arqd a database of "
                  "its own, or rebuild its WAL from this one (arq-replay restore)",
                  wm, acked_next);
        return DRAIN_FOREIGN;
    }
    pthread_mutex_lock(&s->mu);
    s->st.watermark = wm;
    pthread_mutex_unlock(&s->mu);
    sync_sb_reset(&s->sb);
    s->sql_err = 0;
    s->batch_rows = 0;
    s->arena_len = 0;
    pending_clear(s);
    wal_read_result_t res;
    rc = wal_log_read(s->wal, wm + 1, s->o.batch_rows, s->o.batch_bytes, row_cb, s, &res);
    if (rc) {
        sync_errf(err, errlen, "WAL read after seq %" PRIu64 ": %s (bad seq %" PRIu64 ")", wm,
                  wal_strerror(rc), res.bad_seq);
        return SYNC_ESQL;
    }
    if (s->sql_err)
        return s->sql_err;
    if (s->batch_rows == 0) {
        s->oldest_unsynced_ts = 0;
        return 0;
    }
    if (s->batch_first_seq != wm + 1) {
        /* Retention must only drop synced records; say it loudly, go on. */
        sync_errf(err, errlen,
                  "WAL records %" PRIu64 "..%" PRIu64 " were dropped before they reached MySQL",
                  wm + 1, s->batch_first_seq - 1);
        set_state(s, SYNC_STATE_DEGRADED, err);
    }
    /* BEGIN; INSERT rows; INSERT IGNORE streams; UPDATE watermark; COMMIT:
     * four round trips (an explicit transaction: no autocommit toggles) */
    s->wm_known = false; /* until this batch committed */
    rc = db_execs(s->m, "START TRANSACTION", err, errlen);
    if (rc)
        return rc;
    if (s->ins) {
        rc = bulk_insert(s, err, errlen);
    } else {
        sql_rows(s);
        rc = build_err(s) ? build_err(s) : db_exec(s->m, s->sb.p, s->sb.len, err, errlen);
    }
    if (!rc && s->n_pending) {
        sync_sb_reset(&s->sb);
        sql_streams(s);
        if (build_err(s))
            rc = build_err(s);
        else if (s->sb.len)
            rc = db_exec(s->m, s->sb.p, s->sb.len, err, errlen);
    }
    if (!rc) {
        char up[256];
        snprintf(up, sizeof(up),
                 "UPDATE arq_sync_state SET watermark_seq = %" PRIu64 ", updated_us = %" PRId64
                 " WHERE id = 1 AND watermark_seq = %" PRIu64,
                 s->batch_last_seq, wall_us(), wm);
        rc = db_execs(s->m, up, err, errlen);
        if (!rc && mysql_affected_rows(s->m) != 1) {
            sync_errf(err, errlen,
                      "the watermark moved under us (another arqd syncing the same "
                      "database?)");
            rc = SYNC_ESQL;
        }
    }
    if (!rc && s->o.lease_ms)
        rc = fence(s, err, errlen); /* last: the row lock is held the shortest */
    if (!rc && mysql_commit(s->m)) {
        sync_errf(err, errlen, "MySQL commit: error %u: %s", mysql_errno(s->m), mysql_error(s->m));
        rc = SYNC_ESQL;
    }
    if (rc) {
        (void)mysql_rollback(s->m);
        streams_forget(s); /* their inserts may have been rolled back */
        return rc;
    }
    s->wm_known = true;
    s->wm_last = s->batch_last_seq;
    for (size_t i = 0; i < s->n_pending; i++) {
        known_insert(s, s->pending[i]);
        s->pending[i] = NULL;
    }
    s->n_pending = 0;
    pthread_mutex_lock(&s->mu);
    s->st.watermark = s->batch_last_seq;
    s->st.rows += s->batch_rows;
    s->st.batches++;
    hist_add(s->st.batch_buckets, s->batch_rows);
    pthread_mutex_unlock(&s->mu);
    progress(s);
    return (int64_t)s->batch_rows;
}

/* ---- cursors ----------------------------------------------------------- */

#define CURSOR_ROWS_PER_INSERT 5000

static const char cursor_upsert_tail[] =
    " ON DUPLICATE KEY UPDATE `offset` = IF(VALUES(updated_us) >= updated_us, "
    "VALUES(`offset`), `offset`), updated_us = GREATEST(updated_us, VALUES(updated_us))";

/* One upsert pass (cursors, sessions): rows changed after `since` go into
 * multi-row INSERTs of at most max_rows rows, all built in s->sb before any
 * runs (the WAL's read transaction stays short: no MySQL inside it). */
struct upsert_ctx {
    sync_t *s;
    const char *tail; /* the ON DUPLICATE KEY UPDATE clause */
    int max_rows;
    int64_t since; /* rows at or before it were synced by an earlier pass */
    int n;         /* rows in the statement being built */
    uint64_t rows; /* rows in all of them */
    int64_t hwm;
    size_t *ends; /* where each finished statement ends in s->sb */
    size_t n_ends, cap_ends;
    int err; /* set when the scan was stopped by an error */
};

static int upsert_end_statement(struct upsert_ctx *x)
{
    sync_t *s = x->s;
    sync_sb_adds(&s->sb, x->tail);
    if (build_err(s))
        return build_err(s);
    if (x->n_ends == x->cap_ends) {
        size_t cap = x->cap_ends ? x->cap_ends * 2 : 8;
        size_t *e = realloc(x->ends, cap * sizeof(*e));
        if (!e)
            return SYNC_ENOMEM;
        x->ends = e;
        x->cap_ends = cap;
    }
    x->ends[x->n_ends++] = s->sb.len;
    x->n = 0;
    return 0;
}

/* After a row was added: end the statement when full; non-zero stops the
 * scan (an error, kept in x->err). */
static int upsert_row_done(struct upsert_ctx *x)
{
    x->n++;
    x->rows++;
    if (x->n == x->max_rows)
        x->err = upsert_end_statement(x);
    if (!x->err)
        x->err = build_err(x->s);
    return x->err != 0;
}

/* Run the statements the scan built (rc: the scan's result). */
static int upsert_run(struct upsert_ctx *x, int rc, char *err, size_t errlen)
{
    sync_t *s = x->s;
    if (!rc && x->n > 0)
        rc = upsert_end_statement(x);
    size_t from = 0;
    for (size_t i = 0; i < x->n_ends && !rc; i++) {
        rc = write_fenced(s, s->sb.p + from, x->ends[i] - from, NULL, err, errlen);
        from = x->ends[i];
    }
    free(x->ends);
    x->ends = NULL;
    return rc;
}

static int cursor_row_cb(const char *session, size_t session_len, const char *stream,
                         size_t stream_len, uint64_t offset, int64_t updated_us, void *arg)
{
    struct upsert_ctx *x = arg;
    sync_t *s = x->s;
    if (updated_us <= x->since)
        return 0;
    if (updated_us > x->hwm)
        x->hwm = updated_us;
    sync_sb_adds(&s->sb,
                 x->n ? ","
                      : "INSERT INTO arq_cursors (session, stream, `offset`, updated_us) VALUES ");
    sync_sb_adds(&s->sb, "(");
    sync_sb_hex(&s->sb, session, session_len);
    sync_sb_adds(&s->sb, ",");
    sync_sb_hex(&s->sb, stream, stream_len);
    sync_sb_addf(&s->sb, ",%" PRIu64 ",%" PRId64 ")", offset, updated_us);
    return upsert_row_done(x);
}

/* Latest value wins: upsert every cursor changed since the last pass, in
 * statements of CURSOR_ROWS_PER_INSERT rows. The high-water mark moves only
 * once all of them went in: a pass that stopped part-way would otherwise
 * skip, for good, the rows after the cut whose updated_us is below the
 * newest one it saw (the scan is in key order, not time order). */
static int sync_cursors(sync_t *s, char *err, size_t errlen)
{
    sync_sb_reset(&s->sb);
    s->sql_err = 0;
    struct upsert_ctx x = {.s = s,
                           .tail = cursor_upsert_tail,
                           .max_rows = CURSOR_ROWS_PER_INSERT,
                           .since = s->cursor_hwm_us,
                           .hwm = s->cursor_hwm_us};
    int rc = wal_cursor_list(s->wal, cursor_row_cb, &x) != 0 ? SYNC_ESQL : x.err;
    rc = upsert_run(&x, rc, err, errlen);
    if (rc)
        return rc;
    s->cursor_hwm_us = x.hwm;
    pthread_mutex_lock(&s->mu);
    s->st.cursors += x.rows;
    pthread_mutex_unlock(&s->mu);
    return 0;
}

/* ---- sessions ---------------------------------------------------------- */

/* A session row is up to ~1.2 KB of SQL (id and owner 255 bytes, secret 64,
 * as hex): 1,000 keep a statement near 1 MB, far below max_allowed_packet. */
#define SESSION_ROWS_PER_INSERT 1000

/* updated_us = max(created_us, seen_us): every write of a session in the
 * WAL stamps seen_us, so it orders the writes. Latest write wins, as in
 * arq_cursors: a row is replaced whole by a write at least as new, never by
 * an older one. */
static const char session_upsert_tail[] =
    " ON DUPLICATE KEY UPDATE"
    " owner = IF(VALUES(updated_us) >= updated_us, VALUES(owner), owner),"
    " secret = IF(VALUES(updated_us) >= updated_us, VALUES(secret), secret),"
    " created_us = IF(VALUES(updated_us) >= updated_us, VALUES(created_us), created_us),"
    " seen_us = IF(VALUES(updated_us) >= updated_us, VALUES(seen_us), seen_us),"
    " updated_us = GREATEST(updated_us, VALUES(updated_us))";

static int64_t session_updated_us(const wal_session_t *ws)
{
    return ws->seen_us > ws->created_us ? ws->seen_us : ws->created_us;
}

static int session_row_cb(const char *session, size_t session_len, const wal_session_t *ws,
                          void *arg)
{
    struct upsert_ctx *x = arg;
    sync_t *s = x->s;
    int64_t updated_us = session_updated_us(ws);
    if (updated_us <= x->since)
        return 0;
    if (updated_us > x->hwm)
        x->hwm = updated_us;
    sync_sb_adds(&s->sb, x->n ? ","
                              : "INSERT INTO arq_sessions (session, owner, secret, created_us, "
                                "seen_us, updated_us) VALUES ");
    sync_sb_adds(&s->sb, "(");
    sync_sb_hex(&s->sb, session, session_len);
    sync_sb_adds(&s->sb, ",");
    sync_sb_hex(&s->sb, ws->owner, ws->owner_len);
    sync_sb_adds(&s->sb, ",");
    sync_sb_hex(&s->sb, ws->secret, ws->secret_len);
    sync_sb_addf(&s->sb, ",%" PRId64 ",%" PRId64 ",%" PRId64 ")", ws->created_us, ws->seen_us,
                 updated_us);
    return upsert_row_done(x);
}

/* The sessions a client resumes with, for a node rebuilt from MySQL
 * (arq-replay restore): every session written since the last pass, by the
 * rules of sync_cursors (the high-water mark, here on max(created_us,
 * seen_us), moves only once every statement went in). */
static int sync_sessions(sync_t *s, char *err, size_t errlen)
{
    sync_sb_reset(&s->sb);
    s->sql_err = 0;
    struct upsert_ctx x = {.s = s,
                           .tail = session_upsert_tail,
                           .max_rows = SESSION_ROWS_PER_INSERT,
                           .since = s->session_hwm_us,
                           .hwm = s->session_hwm_us};
    int wrc = wal_session_list(s->wal, session_row_cb, &x);
    int rc = x.err;
    if (wrc) {
        sync_errf(err, errlen, "reading the WAL's sessions: %s", wal_strerror(wrc));
        rc = SYNC_ESQL;
    }
    rc = upsert_run(&x, rc, err, errlen);
    if (rc)
        return rc;
    s->session_hwm_us = x.hwm;
    pthread_mutex_lock(&s->mu);
    s->st.sessions += x.rows;
    pthread_mutex_unlock(&s->mu);
    return 0;
}

/* A GC page's DELETE (built in s->sb when gone > 0), fenced; the rows it
 * removed are added to *deleted (rows written again since the SELECT are not
 * among them). */
static int gc_delete(sync_t *s, int gone, uint64_t *deleted, char *err, size_t errlen)
{
    int rc = build_err(s);
    if (rc || !gone)
        return rc;
    uint64_t affected = 0;
    rc = write_fenced(s, s->sb.p, s->sb.len, &affected, err, errlen);
    if (!rc)
        *deleted += affected;
    return rc;
}

/*
 * Sessions the WAL deleted (expired, evicted) leave arq_sessions by the
 * rule of sync_cursor_gc (which runs this): a row goes only if the WAL no
 * longer holds the session and it was written at or after the WAL's
 * creation, or is older than cursor_ttl_s (an earlier WAL's session, idle
 * that long, has expired). Paged by key; each DELETE names the updated_us
 * it saw, so a session written again meanwhile stays (and is upserted by
 * the next pass: both run on this thread).
 */
static int sync_session_gc(sync_t *s, int64_t wal_created_us, char *err, size_t errlen)
{
    uint8_t last[256];
    unsigned long last_len = 0;
    bool first = true;
    uint64_t deleted = 0;
    for (;;) {
        sync_sb_reset(&s->sb);
        sync_sb_addf(&s->sb,
                     "SELECT session, updated_us FROM arq_sessions WHERE (updated_us >= %" PRId64,
                     wal_created_us);
        if (s->o.cursor_ttl_s)
            sync_sb_addf(&s->sb, " OR updated_us < %" PRId64,
                         wall_us() - (int64_t)s->o.cursor_ttl_s * 1000000);
        sync_sb_adds(&s->sb, ")");
        if (!first) {
            sync_sb_adds(&s->sb, " AND session > ");
            sync_sb_hex(&s->sb, (const char *)last, last_len);
        }
        sync_sb_addf(&s->sb, " ORDER BY session LIMIT %d", CURSOR_ROWS_PER_INSERT);
        if (build_err(s))
            return build_err(s);
        if (mysql_real_query(s->m, s->sb.p, (unsigned long)s->sb.len) != 0) {
            sync_errf(err, errlen, "MySQL error %u: %s", mysql_errno(s->m), mysql_error(s->m));
            return SYNC_ESQL;
        }
        MYSQL_RES *res = mysql_store_result(s->m);
        if (!res) {
            sync_errf(err, errlen, "MySQL error %u: %s", mysql_errno(s->m), mysql_error(s->m));
            return SYNC_ESQL;
        }
        sync_sb_reset(&s->sb);
        int n = 0, gone = 0;
        MYSQL_ROW row;
        while ((row = mysql_fetch_row(res))) {
            unsigned long *len = mysql_fetch_lengths(res);
            n++;
            if (!len || len[0] > sizeof last || !row[1]) {
                mysql_free_result(res);
                sync_errf(err, errlen, "arq_sessions holds a row this build cannot page past");
                return SYNC_ESQL;
            }
            memcpy(last, row[0], len[0]);
            last_len = len[0];
            wal_session_t ws;
            if (wal_session_get(s->wal, row[0], len[0], &ws) != WAL_ENOTFOUND)
                continue;
            sync_sb_adds(&s->sb, gone ? " OR (session = "
                                      : "DELETE FROM arq_sessions WHERE "
                                        "(session = ");
            sync_sb_hex(&s->sb, row[0], len[0]);
            sync_sb_addf(&s->sb, " AND updated_us = %" PRId64 ")",
                         (int64_t)strtoll(row[1], NULL, 10));
            gone++;
        }
        mysql_free_result(res);
        first = false;
        int rc = gc_delete(s, gone, &deleted, err, errlen);
        if (rc)
            return rc;
        if (n < CURSOR_ROWS_PER_INSERT)
            break;
    }
    pthread_mutex_lock(&s->mu);
    s->st.sessions_deleted += deleted;
    pthread_mutex_unlock(&s->mu);
    return 0;
}

/*
 * Cursors the WAL deleted (an unsubscribe, an expired session) leave MySQL
 * too. A row goes only if the WAL no longer holds it and either the WAL made
 * it (updated at or after the WAL's creation) or it is older than
 * cursor_ttl_s. Rows of an earlier WAL (the evidence of acked offsets a
 * restore reads back) are so kept for a session's lifetime, then dropped:
 * a session idle that long has expired. The DELETE names the updated_us it
 * saw, and the upserts run on this same thread, so a cursor written again
 * meanwhile is upserted by the next pass. The sessions follow
 * (sync_session_gc), by the same rule.
 */
static int sync_cursor_gc(sync_t *s, char *err, size_t errlen)
{
    wal_stats_t ws;
    if (wal_stats_get(s->wal, &ws) != 0 || ws.created_us <= 0)
        return 0; /* no era to tell our rows by: keep everything */
    uint8_t last_sess[256], last_stream[256];
    unsigned long last_sess_len = 0, last_stream_len = 0;
    bool first = true;
    uint64_t deleted = 0;
    for (;;) {
        sync_sb_reset(&s->sb);
        sync_sb_addf(&s->sb,
                     "SELECT session, stream, updated_us FROM arq_cursors WHERE (updated_us >= "
                     "%" PRId64,
                     ws.created_us);
        if (s->o.cursor_ttl_s)
            sync_sb_addf(&s->sb, " OR updated_us < %" PRId64,
                         wall_us() - (int64_t)s->o.cursor_ttl_s * 1000000);
        sync_sb_adds(&s->sb, ")");
        if (!first) {
            sync_sb_adds(&s->sb, " AND (session > ");
            sync_sb_hex(&s->sb, (const char *)last_sess, last_sess_len);
            sync_sb_adds(&s->sb, " OR (session = ");
            sync_sb_hex(&s->sb, (const char *)last_sess, last_sess_len);
            sync_sb_adds(&s->sb, " AND stream > ");
            sync_sb_hex(&s->sb, (const char *)last_stream, last_stream_len);
            sync_sb_adds(&s->sb, "))");
        }
        sync_sb_addf(&s->sb, " ORDER BY session, stream LIMIT %d", CURSOR_ROWS_PER_INSERT);
        if (build_err(s))
            return build_err(s);
        if (mysql_real_query(s->m, s->sb.p, (unsigned long)s->sb.len) != 0) {
            sync_errf(err, errlen, "MySQL error %u: %s", mysql_errno(s->m), mysql_error(s->m));
            return SYNC_ESQL;
        }
        MYSQL_RES *res = mysql_store_result(s->m);
        if (!res) {
            sync_errf(err, errlen, "MySQL error %u: %s", mysql_errno(s->m), mysql_error(s->m));
            return SYNC_ESQL;
        }
        sync_sb_reset(&s->sb);
        int n = 0, gone = 0;
        MYSQL_ROW row;
        while ((row = mysql_fetch_row(res))) {
            unsigned long *len = mysql_fetch_lengths(res);
            n++;
            if (!len || len[0] > sizeof last_sess || len[1] > sizeof last_stream || !row[2]) {
                /* the schema allows neither; stop rather than page in place */
                mysql_free_result(res);
                sync_errf(err, errlen, "arq_cursors holds a row this build cannot page past");
                return SYNC_ESQL;
            }
            memcpy(last_sess, row[0], len[0]);
            last_sess_len = len[0];
            memcpy(last_stream, row[1], len[1]);
            last_stream_len = len[1];
            uint64_t off;
            if (wal_cursor_get(s->wal, row[0], len[0], row[1], len[1], &off) != WAL_ENOTFOUND)
                continue;
            sync_sb_adds(&s->sb, gone ? " OR (session = "
                                      : "DELETE FROM arq_cursors WHERE "
                                        "(session = ");
            sync_sb_hex(&s->sb, row[0], len[0]);
            sync_sb_adds(&s->sb, " AND stream = ");
            sync_sb_hex(&s->sb, row[1], len[1]);
            sync_sb_addf(&s->sb, " AND updated_us = %" PRId64 ")",
                         (int64_t)strtoll(row[2], NULL, 10));
            gone++;
        }
        mysql_free_result(res);
        first = false;
        int rc = gc_delete(s, gone, &deleted, err, errlen);
        if (rc)
            return rc;
        if (n < CURSOR_ROWS_PER_INSERT)
            break;
    }
    pthread_mutex_lock(&s->mu);
    s->st.cursors_deleted += deleted;
    pthread_mutex_unlock(&s->mu);
    return sync_session_gc(s, ws.created_us, err, errlen);
}

/* ---- retention --------------------------------------------------------- */

struct ts_ctx {
    uint64_t seq;
    int64_t ts;
};

static int ts_cb(const wal_record_t *rec, void *arg)
{
    struct ts_ctx *t = arg;
    t->seq = rec->seq;
    t->ts = rec->timestamp_us;
    return 1;
}

/* The record at or after seq (its seq and timestamp); -1 if none. */
static int record_at(wal_t *wal, uint64_t seq, struct ts_ctx *t)
{
    wal_read_result_t r;
    t->seq = 0;
    if (wal_log_read(wal, seq, 1, UINT64_MAX, ts_cb, t, &r) != 0 || t->seq == 0)
        return -1;
    return 0;
}

/* Drop what the limits allow, never above the watermark (synced). */
static void retain_pass(sync_t *s, uint64_t synced)
{
    wal_stats_t ws;
    if (wal_stats_get(s->wal, &ws) != 0 || synced < ws.first_seq)
        return;
    uint64_t upto = 0;
    if (s->o.retain_age_s) {
        /* Timestamps grow with the sequence (up to clock steps): binary
         * search the last synced record older than the cutoff. */
        int64_t cutoff = wall_us() - (int64_t)s->o.retain_age_s * 1000000;
        uint64_t lo = ws.first_seq, hi = synced;
        while (lo <= hi) {
            uint64_t mid = lo + (hi - lo) / 2;
            struct ts_ctx t;
            if (record_at(s->wal, mid, &t) != 0 || t.seq > hi)
                break;
            if (t.ts < cutoff) {
                upto = t.seq;
                lo = t.seq + 1;
            } else {
                if (mid == 0)
                    break;
                hi = mid - 1;
            }
        }
    }
    if (s->o.retain_bytes && ws.live_bytes > s->o.retain_bytes && ws.next_seq > ws.first_seq) {
        uint64_t n = ws.next_seq - ws.first_seq;
        uint64_t per = ws.live_bytes / n ? ws.live_bytes / n : 1;
        uint64_t drop = (ws.live_bytes - s->o.retain_bytes) / per + 1;
        uint64_t by_size = ws.first_seq + drop - 1;
        if (by_size > upto)
            upto = by_size;
    }
    if (upto > synced)
        upto = synced;
    if (upto < ws.first_seq)
        return;
    uint64_t dropped = 0;
    int rc = wal_retain(s->wal, upto, &dropped);
    pthread_mutex_lock(&s->mu);
    s->st.retained += dropped;
    if (rc)
        snprintf(s->st.last_error, sizeof(s->st.last_error),
                 "WAL retention up to seq %" PRIu64 ": %s", upto, wal_strerror(rc));
    pthread_mutex_unlock(&s->mu);
}

/* ---- thread ------------------------------------------------------------ */

/* The idle renewal, and whether a switchover asks us to hand over. */
static int renew(sync_t *s, char *err, size_t errlen)
{
    int rc = fence(s, err, errlen);
    if (rc)
        return rc;
    if (mysql_query(s->m, "SELECT handoff FROM arq_lease WHERE id = 1")) {
        sync_errf(err, errlen, "MySQL error %u: %s", mysql_errno(s->m), mysql_error(s->m));
        return SYNC_ESQL;
    }
    MYSQL_RES *r = mysql_store_result(s->m);
    MYSQL_ROW row = r ? mysql_fetch_row(r) : NULL;
    int handoff = row && row[0] && atoi(row[0]) != 0;
    if (r)
        mysql_free_result(r);
    pthread_mutex_lock(&s->mu);
    bool changed = s->st.handoff != handoff;
    s->st.handoff = handoff;
    pthread_mutex_unlock(&s->mu);
    if (changed)
        progress(s);
    return 0;
}

/* Switchover: once everything acknowledged is in MySQL, cursors and sessions too,
 * give the lease up (expired now; the owner stays named: if this node takes
 * it back before anyone else, its WAL is still the history's). 1: released
 * (the drain stops), 0: not yet, or < 0. */
static int release_step(sync_t *s, int64_t drained, char *err, size_t errlen)
{
    pthread_mutex_lock(&s->mu);
    bool req = s->release_req;
    uint64_t wm = s->st.watermark;
    pthread_mutex_unlock(&s->mu);
    if (!req || drained != 0 || wm + 1 < wal_acked_next_seq(s->wal))
        return 0;
    int rc = sync_cursors(s, err, errlen);
    if (!rc)
        rc = sync_sessions(s, err, errlen);
    if (rc)
        return rc;
    char q[512];
    snprintf(q, sizeof(q),
             "UPDATE arq_lease SET expires_us = 0, handoff = 0, updated_us = %" PRId64
             " WHERE id = 1 AND generation = %" PRIu64,
             wall_us(), s->o.lease_generation);
    rc = db_execs(s->m, q, err, errlen);
    if (rc)
        return rc;
    if (mysql_affected_rows(s->m) != 1) {
        sync_errf(err, errlen, "lost the lease before releasing it");
        return DRAIN_FENCED;
    }
    pthread_mutex_lock(&s->mu);
    s->released = true;
    s->release_rc = SYNC_OK;
    pthread_cond_broadcast(&s->cond);
    pthread_mutex_unlock(&s->mu);
    return 1;
}

static uint64_t rand_below(uint64_t n)
{
    uint64_t r = 0;
    if (getrandom(&r, sizeof(r), 0) != (ssize_t)sizeof(r))
        r = (uint64_t)rand();
    return n ? r % n : 0;
}

/* Sleep ms unless stopped (or, if kickable, kicked: the idle poll, never
 * a backoff); returns true if stopped. */
static bool wait_ms(sync_t *s, uint64_t ms, bool kickable)
{
    struct timespec dl;
    clock_gettime(CLOCK_REALTIME, &dl);
    dl.tv_sec += (time_t)(ms / 1000);
    dl.tv_nsec += (long)(ms % 1000) * 1000000;
    if (dl.tv_nsec >= 1000000000) {
        dl.tv_sec++;
        dl.tv_nsec -= 1000000000;
    }
    pthread_mutex_lock(&s->mu);
    while (!s->stop && !(kickable && s->kicked) &&
           pthread_cond_timedwait(&s->cond, &s->mu, &dl) != ETIMEDOUT)
        ;
    if (kickable)
        s->kicked = false;
    bool stop = s->stop;
    pthread_mutex_unlock(&s->mu);
    return stop;
}

static void update_lag(sync_t *s)
{
    wal_stats_t ws;
    if (wal_stats_get(s->wal, &ws) != 0)
        return;
    pthread_mutex_lock(&s->mu);
    uint64_t wm = s->st.watermark;
    pthread_mutex_unlock(&s->mu);
    if (!s->oldest_unsynced_ts && wm + 1 < ws.next_seq) {
        /* No batch read yet (MySQL down since the start, or the drain
         * caught up before these came): the age is the first unsynced
         * record's, so that the lag grows while MySQL is away. */
        struct ts_ctx t;
        if (record_at(s->wal, wm + 1 > ws.first_seq ? wm + 1 : ws.first_seq, &t) == 0)
            s->oldest_unsynced_ts = t.ts;
    }
    pthread_mutex_lock(&s->mu);
    /* acknowledged appends count even before the journal's next fold makes
     * them readable: "lag 0" must mean every acked message is in MySQL */
    s->st.wal_next = ws.acked_next_seq;
    s->st.lag_seconds = s->oldest_unsynced_ts && s->st.watermark + 1 < ws.next_seq
                            ? (double)(wall_us() - s->oldest_unsynced_ts) / 1e6
                            : 0;
    pthread_mutex_unlock(&s->mu);
}

static void *sync_main(void *arg)
{
    sync_t *s = arg;
    char err[512];
    unsigned attempt = 0;
    mysql_thread_init();
    for (;;) {
        pthread_mutex_lock(&s->mu);
        bool stop = s->stop;
        pthread_mutex_unlock(&s->mu);
        if (stop)
            break;
        if (!s->m) {
            err[0] = 0;
            s->wm_known = false;
            s->m = sync_mysql_connect(&s->url, err, sizeof(err));
            int rc = s->m ? migrate_conn(s->m, NULL, err, sizeof(err)) : SYNC_ECONNECT;
            if (rc == SYNC_ESCHEMA) {
                set_state(s, SYNC_STATE_FAILED, err);
                break;
            }
            if (rc) {
                if (s->m) {
                    mysql_close(s->m);
                    s->m = NULL;
                }
                set_state(s, SYNC_STATE_DEGRADED, err);
                update_lag(s); /* MySQL is away: the lag still grows */
                uint64_t cap = (uint64_t)s->o.backoff_base_ms << (attempt < 16 ? attempt : 16);
                if (cap > s->o.backoff_cap_ms)
                    cap = s->o.backoff_cap_ms;
                attempt++;
                if (wait_ms(s, 1 + rand_below(cap), false))
                    break;
                continue;
            }
            if (attempt) {
                pthread_mutex_lock(&s->mu);
                s->st.reconnects++;
                pthread_mutex_unlock(&s->mu);
            }
            attempt = 0;
            streams_forget(s);
            stmt_prepare(s);
            s->next_renew_us = 0; /* a reconnect proves the lease first */
            if (!s->o.lease_ms)
                set_state(s, SYNC_STATE_OK, NULL);
        }
        err[0] = 0;
        int64_t n = 0;
        if (s->o.lease_ms && wall_us() >= s->next_renew_us)
            n = renew(s, err, sizeof(err));
        if (n == 0)
            n = drain_once(s, err, sizeof(err));
        int crc = 0;
        if (n >= 0 && wall_us() >= s->next_cursor_us) {
            crc = sync_cursors(s, err, sizeof(err));
            crc = crc ? crc : sync_sessions(s, err, sizeof(err));
            s->next_cursor_us = wall_us() + (int64_t)s->o.cursor_every_ms * 1000;
        }
        if (n >= 0 && !crc && wall_us() >= s->next_cursor_gc_us) {
            crc = sync_cursor_gc(s, err, sizeof(err));
            s->next_cursor_gc_us = wall_us() + (int64_t)s->o.cursor_gc_every_ms * 1000;
        }
        update_lag(s);
        if (n >= 0 && !crc && (s->o.retain_age_s || s->o.retain_bytes) &&
            wall_us() >= s->next_retain_us) {
            pthread_mutex_lock(&s->mu);
            uint64_t synced = s->st.watermark;
            pthread_mutex_unlock(&s->mu);
            retain_pass(s, synced);
            s->next_retain_us = wall_us() + (int64_t)s->o.retain_every_ms * 1000;
        }
        if (n == DRAIN_FOREIGN) {
            set_state(s, SYNC_STATE_FAILED, err); /* retrying cannot help */
            break;
        }
        if (n == DRAIN_FENCED || crc == DRAIN_FENCED) {
            set_state(s, SYNC_STATE_FENCED, err); /* never write again */
            break;
        }
        if (n >= 0 && !crc) {
            int r = release_step(s, n, err, sizeof(err));
            if (r == 1)
                break;
            if (r == DRAIN_FENCED) {
                set_state(s, SYNC_STATE_FENCED, err);
                break;
            }
            crc = r;
        }
        if (n < 0 || crc) {
            if (n == SYNC_ENOMEM || crc == SYNC_ENOMEM) {
                set_state(s, SYNC_STATE_DEGRADED, "out of memory");
            } else {
                set_state(s, SYNC_STATE_DEGRADED, err);
            }
            stmt_drop(s);
            mysql_close(s->m);
            s->m = NULL;
            update_lag(s);
            attempt = 1;
            if (wait_ms(s, 1 + rand_below(s->o.backoff_base_ms), false))
                break;
            continue;
        }
        pthread_mutex_lock(&s->mu);
        bool was_degraded = s->st.state != SYNC_STATE_OK;
        pthread_mutex_unlock(&s->mu);
        if (was_degraded)
            set_state(s, SYNC_STATE_OK, NULL);
        if (n == 0 && wait_ms(s, s->o.batch_wait_ms, true))
            break;
    }
    stmt_drop(s);
    if (s->m) {
        mysql_close(s->m);
        s->m = NULL;
    }
    pthread_mutex_lock(&s->mu);
    if (s->release_req && !s->released) {
        s->released = true;
        s->release_rc = s->st.state == SYNC_STATE_FENCED ? SYNC_EFENCED : SYNC_ESQL;
    }
    pthread_cond_broadcast(&s->cond);
    pthread_mutex_unlock(&s->mu);
    mysql_thread_end();
    return NULL;
}

int sync_start(wal_t *wal, const sync_options_t *opts, sync_t **ret)
{
    sync_t *s = calloc(1, sizeof(*s));
    if (!s)
        return SYNC_ENOMEM;
    s->wal = wal;
    s->o = *opts;
    if (!s->o.batch_rows)
        s->o.batch_rows = 1000;
    if (!s->o.batch_bytes)
        s->o.batch_bytes = 8u << 20;
    if (!s->o.batch_wait_ms)
        s->o.batch_wait_ms = 20;
    if (!s->o.backoff_base_ms)
        s->o.backoff_base_ms = 100;
    if (!s->o.backoff_cap_ms)
        s->o.backoff_cap_ms = 10000;
    if (!s->o.cursor_every_ms)
        s->o.cursor_every_ms = 1000;
    if (!s->o.retain_every_ms)
        s->o.retain_every_ms = 5000;
    if (!s->o.cursor_gc_every_ms)
        s->o.cursor_gc_every_ms = 60000;
    if (sync_url_copy(&s->url, opts->url) != 0) {
        free(s);
        return SYNC_ENOMEM;
    }
    if (s->o.lease_ms) {
        s->owner = strdup(opts->lease_owner ? opts->lease_owner : "");
        wal_stats_t ws;
        s->wal_id = wal_stats_get(wal, &ws) == 0 ? ws.created_us : 0;
        s->st.lease_generation = s->o.lease_generation;
        if (!s->owner) {
            sync_url_free(&s->url);
            free(s);
            return SYNC_ENOMEM;
        }
    }
    s->o.lease_owner = s->owner;
    s->o.url = &s->url;
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cond, NULL);
    if (pthread_create(&s->thread, NULL, sync_main, s) != 0) {
        sync_url_free(&s->url);
        free(s);
        return SYNC_ENOMEM;
    }
    *ret = s;
    return 0;
}

void sync_stop(sync_t *s)
{
    if (!s)
        return;
    pthread_mutex_lock(&s->mu);
    s->stop = true;
    pthread_cond_broadcast(&s->cond);
    pthread_mutex_unlock(&s->mu);
    pthread_join(s->thread, NULL);
    streams_forget(s);
    free(s->known);
    pending_clear(s);
    free(s->pending);
    free(s->rows);
    free(s->arena);
    sync_sb_free(&s->sb);
    sync_sb_free(&s->fb);
    free(s->owner);
    sync_url_free(&s->url);
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->cond);
    free(s);
}

void sync_kick(sync_t *s)
{
    pthread_mutex_lock(&s->mu);
    s->kicked = true;
    pthread_cond_broadcast(&s->cond);
    pthread_mutex_unlock(&s->mu);
}

int sync_release(sync_t *s, uint32_t timeout_ms)
{
    if (!s->o.lease_ms)
        return SYNC_ESQL;
    struct timespec dl;
    clock_gettime(CLOCK_REALTIME, &dl);
    dl.tv_sec += (time_t)(timeout_ms / 1000);
    dl.tv_nsec += (long)(timeout_ms % 1000) * 1000000;
    if (dl.tv_nsec >= 1000000000) {
        dl.tv_sec++;
        dl.tv_nsec -= 1000000000;
    }
    pthread_mutex_lock(&s->mu);
    s->release_req = true;
    s->kicked = true;
    pthread_cond_broadcast(&s->cond);
    int rc = SYNC_EBUSY;
    while (!s->released && pthread_cond_timedwait(&s->cond, &s->mu, &dl) != ETIMEDOUT)
        ;
    if (s->released)
        rc = s->release_rc;
    pthread_mutex_unlock(&s->mu);
    return rc;
}

void sync_stats_get(sync_t *s, sync_stats_t *ret)
{
    pthread_mutex_lock(&s->mu);
    *ret = s->st;
    pthread_mutex_unlock(&s->mu);
    /* fresh, not as of the drain's last turn: a publish acknowledged a
     * moment ago counts in the lag at once */
    uint64_t acked = wal_acked_next_seq(s->wal);
    if (acked > ret->wal_next)
        ret->wal_next = acked;
}

/*
 * arq_replay_restore.c - arq-replay restore: rebuild a WAL in a new
 * directory from MySQL's copy and/or from the readable records of a damaged
 * or older WAL (a backup).
 *
 * Records keep their sequence, offset, stream id and timestamp (wal.h,
 * wal_restore_*), so each is byte for byte the original and its checksum
 * equals MySQL's checksum column; the new WAL's next sequence is past the
 * sync watermark, so the drain continues exactly where it was. Per stream
 * the new WAL holds a contiguous run of offsets ending at the last one any
 * source has: offsets below it stay in MySQL (the cold tier serves them),
 * offsets no source has are reported as lost. A stream whose history is
 * incomplete - offsets lost, its tail evidently lost (a session acked beyond
 * the last offset MySQL holds), or its epoch unknown - gets a new epoch, so
 * that clients learn that their offsets may name other messages now.
 * Sessions and their cursors come from OLD, or without it from MySQL
 * (arq_sessions, arq_cursors), so that clients resume them.
 */
#include <dirent.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "arq_replay.h"

static const char restore_usage[] =
    "usage: arq-replay restore --data-dir NEW [--database-url URL] [--from-wal OLD]\n"
    "                          [--new-epoch] [--tail N] [--dry-run]\n"
    "\n"
    "Rebuild a WAL in NEW (which must not exist, or be empty) from MySQL and/or\n"
    "from OLD, a damaged or older WAL (e.g. a backup: its readable records are\n"
    "used, MySQL fills in corrupt ones and everything newer). Stop arqd first;\n"
    "then point it at NEW.\n"
    "\n"
    "Every record keeps its offset, sequence and timestamp; each stream keeps its\n"
    "id and epoch if its history is complete. Per stream NEW holds the offsets\n"
    "from OLD's first (all of MySQL's without OLD; the last N with --tail N) up\n"
    "to the last one known; older ones stay in MySQL (the cold tier). A stream\n"
    "gets a NEW EPOCH when offsets are lost (in no source), when a session acked\n"
    "beyond its last known offset (the WAL's tail was lost), when its epoch is\n"
    "unknown, or with --new-epoch. MySQL alone cannot show records the drain had\n"
    "not written before the loss: if arq_sync_lag_records was not 0 then, use\n"
    "--new-epoch. Sessions and their cursors come from OLD with --from-wal, else\n"
    "from MySQL (arq_sessions, arq_cursors), so that clients resume them; a\n"
    "cursor of a stream given a new epoch is left out (that client resubscribes).\n"
    "Streams given a new epoch get it in MySQL's arq_streams too.\n"
    "\n"
    "Exit status: 0 rebuilt with complete histories; 1 rebuilt with losses (see\n"
    "the report), or failed (NEW is removed); 2 usage.\n";

/* ---- intervals ------------------------------------------------------------- */

typedef struct ivs {
    uint64_t (*v)[2];
    size_t n, cap;
    bool oom;
} ivs_t;

static void ivs_add(ivs_t *s, uint64_t lo, uint64_t hi)
{
    if (lo > hi)
        return;
    if (s->n && s->v[s->n - 1][1] + 1 >= lo) {
        if (hi > s->v[s->n - 1][1])
            s->v[s->n - 1][1] = hi;
        return;
    }
    if (s->n == s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 8;
        uint64_t(*nv)[2] = realloc(s->v, cap * sizeof(*nv));
        if (!nv) {
            s->oom = true;
            return;
        }
        s->v = nv;
        s->cap = cap;
    }
    s->v[s->n][0] = lo;
    s->v[s->n][1] = hi;
    s->n++;
}

static void ivs_free(ivs_t *s)
{
    free(s->v);
    memset(s, 0, sizeof(*s));
}

/* out = a ∩ b (both sorted, disjoint) */
static void ivs_intersect(const ivs_t *a, const ivs_t *b, ivs_t *out)
{
    size_t i = 0, j = 0;
    while (i < a->n && j < b->n) {
        uint64_t lo = a->v[i][0] > b->v[j][0] ? a->v[i][0] : b->v[j][0];
        uint64_t hi = a->v[i][1] < b->v[j][1] ? a->v[i][1] : b->v[j][1];
        ivs_add(out, lo, hi);
        if (a->v[i][1] < b->v[j][1])
            i++;
        else
            j++;
    }
}

/* out = [lo, hi] minus s */
static void ivs_complement(const ivs_t *s, uint64_t lo, uint64_t hi, ivs_t *out)
{
    uint64_t at = lo;
    for (size_t i = 0; i < s->n && at <= hi; i++) {
        if (s->v[i][1] < at)
            continue;
        if (s->v[i][0] > hi)
            break;
        if (s->v[i][0] > at)
            ivs_add(out, at, s->v[i][0] - 1);
        at = s->v[i][1] + 1;
        if (at == 0)
            return;
    }
    if (at <= hi)
        ivs_add(out, at, hi);
}

static bool ivs_contains(const ivs_t *s, uint64_t x)
{
    size_t lo = 0, hi = s->n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (s->v[mid][1] < x)
            lo = mid + 1;
        else if (s->v[mid][0] > x)
            hi = mid;
        else
            return true;
    }
    return false;
}

static int ivs_cb(uint64_t from, uint64_t to, void *arg)
{
    ivs_add(arg, from, to);
    return 0;
}

/* ---- the plan ------------------------------------------------------------------ */

struct plan {
    char *name;
    size_t len;
    bool in_old;
    wal_stream_info_t old;
    sync_db_stream_t db; /* name not kept */
    uint64_t cursor_max;
    ivs_t old_bad; /* corrupt offsets of OLD */
    ivs_t lost;    /* in no source */
    ivs_t cold;    /* below first, served from MySQL */
    ivs_t dropped; /* below first, readable in OLD but not in MySQL: gone with the cut */
    uint64_t end, first;
    uint32_t id, verify_id;
    uint64_t epoch;
    bool new_epoch;
    char why[160];
    int64_t created_us;
    uint64_t restored, from_old, from_db;
};

typedef struct rst {
    rp_opts_t *o;
    const char *old_dir;
    bool new_epoch, dry_run;
    uint64_t tail;
    wal_t *old, *neu;
    sync_db_t *db;
    uint64_t wm;
    struct plan *v;
    size_t n, cap;
    size_t n_old; /* the first n_old plans (OLD's streams) are sorted by name */
    bool oom;
    rp_progress_t prog;
    char err[512];
} rst_t;

static int plan_cmp(const void *a, const void *b)
{
    const struct plan *x = a, *y = b;
    size_t n = x->len < y->len ? x->len : y->len;
    int c = memcmp(x->name, y->name, n);
    return c ? c : (x->len > y->len) - (x->len < y->len);
}

static struct plan *plan_find(rst_t *r, const char *name, size_t len)
{
    struct plan key = {.name = (char *)name, .len = len};
    return r->n ? bsearch(&key, r->v, r->n, sizeof(*r->v), plan_cmp) : NULL;
}

static struct plan *plan_new(rst_t *r, const char *name, size_t len)
{
    if (r->n == r->cap) {
        size_t cap = r->cap ? r->cap * 2 : 32;
        struct plan *nv = realloc(r->v, cap * sizeof(*nv));
        if (!nv) {
            r->oom = true;
            return NULL;
        }
        r->v = nv;
        r->cap = cap;
    }
    struct plan *p = &r->v[r->n];
    memset(p, 0, sizeof(*p));
    p->name = malloc(len + 1);
    if (!p->name) {
        r->oom = true;
        return NULL;
    }
    memcpy(p->name, name, len);
    p->name[len] = 0;
    p->len = len;
    r->n++;
    return p;
}

static int old_list_cb(const wal_stream_info_t *info, void *arg)
{
    rst_t *r = arg;
    struct plan *p = plan_new(r, info->name, info->name_len);
    if (!p)
        return 1;
    p->in_old = true;
    p->old = *info;
    p->old.name = NULL;
    return 0;
}

static int db_list_cb(const sync_db_stream_t *s, void *arg)
{
    rst_t *r = arg;
    /* OLD's streams are sorted and come first; MySQL's only are appended */
    size_t n_sorted = r->n_old;
    struct plan key = {.name = (char *)s->name, .len = s->name_len};
    struct plan *p = n_sorted ? bsearch(&key, r->v, n_sorted, sizeof(*r->v), plan_cmp) : NULL;
    if (!p) {
        p = plan_new(r, s->name, s->name_len);
        if (!p)
            return 1;
    }
    p->db = *s;
    p->db.name = NULL;
    p->db.name_len = 0;
    return 0;
}

static int cursor_cb(const char *stream, size_t len, uint64_t max, void *arg)
{
    rst_t *r = arg;
    struct plan *p = plan_find(r, stream, len);
    if (p && max > p->cursor_max)
        p->cursor_max = max;
    return 0;
}

static int count_cb(const wal_record_t *rec, void *arg)
{
    (void)rec;
    (void)arg;
    return 0;
}

/* OLD's corrupt offsets of one stream (one read of it). */
static int scan_old(rst_t *r, struct plan *p)
{
    uint64_t next = p->old.first_offset;
    while (next < p->old.next_offset) {
        wal_read_result_t res;
        int rc =
            wal_stream_read(r->old, p->name, p->len, next, 10000, 64u << 20, count_cb, NULL, &res);
        rp_progress_add(&r->prog, res.count);
        if (rc == WAL_ECORRUPT) {
            ivs_add(&p->old_bad, res.bad_offset, res.bad_offset);
            next = res.bad_offset + 1;
            continue;
        }
        if (rc) {
            snprintf(r->err, sizeof(r->err), "reading '%s' of %s at offset %" PRIu64 ": %s",
                     p->name, r->old_dir, next, wal_strerror(rc));
            return -1;
        }
        if (res.count == 0)
            break;
        next = res.next;
    }
    return 0;
}

static uint64_t random_epoch(void)
{
    uint64_t v = 0;
    while (v == 0)
        if (getrandom(&v, sizeof(v), 0) != (ssize_t)sizeof(v))
            v = (uint64_t)time(NULL) * 2654435761u;
    return v;
}

static int decide(rst_t *r, struct plan *p)
{
    uint64_t old_last = p->in_old ? p->old.next_offset - 1 : 0;
    p->end = old_last > p->db.max_offset ? old_last : p->db.max_offset;
    /* What OLD cannot give: below its first, its corrupt records, above its
     * last. What MySQL cannot give: its holes. Lost: both. */
    ivs_t old_gone = {0}, db_gone = {0};
    if (p->end >= 1) {
        if (p->in_old) {
            ivs_add(&old_gone, 1, p->old.first_offset - 1);
            for (size_t i = 0; i < p->old_bad.n; i++)
                ivs_add(&old_gone, p->old_bad.v[i][0], p->old_bad.v[i][1]);
            ivs_add(&old_gone, p->old.next_offset, p->end);
        } else {
            ivs_add(&old_gone, 1, p->end);
        }
        if (r->db && p->db.rows) {
            if (sync_db_holes(r->db, p->name, p->len, 1, p->end, ivs_cb, &db_gone, r->err,
                              sizeof(r->err)) != 0) {
                ivs_free(&old_gone);
                ivs_free(&db_gone);
                return -1;
            }
        } else {
            ivs_add(&db_gone, 1, p->end);
        }
        ivs_intersect(&old_gone, &db_gone, &p->lost);
    }
    uint64_t start = p->in_old ? p->old.first_offset : 1;
    if (r->tail && p->end >= r->tail && p->end - r->tail + 1 > start)
        start = p->end - r->tail + 1;
    uint64_t last_lost = p->lost.n ? p->lost.v[p->lost.n - 1][1] : 0;
    p->first = start > last_lost + 1 ? start : last_lost + 1;
    if (p->first > p->end + 1)
        p->first = p->end + 1;
    if (p->first == 0)
        p->first = 1;
    /* Below first: MySQL serves what it has (cold); what only OLD had is
     * dropped with the cut (only without MySQL, or where MySQL lacks it). */
    if (p->first > 1) {
        ivs_t below = {0}, not_lost = {0}, range = {0};
        ivs_complement(&db_gone, 1, p->first - 1, &p->cold);
        ivs_add(&range, 1, p->first - 1);
        ivs_intersect(&db_gone, &range, &below);
        ivs_free(&range);
        ivs_complement(&p->lost, 1, p->first - 1, &not_lost);
        ivs_intersect(&below, &not_lost, &p->dropped);
        bool o2 = below.oom || not_lost.oom;
        ivs_free(&below);
        ivs_free(&not_lost);
        if (o2)
            p->dropped.oom = true;
    }
    bool oom = old_gone.oom || db_gone.oom || p->lost.oom || p->cold.oom || p->dropped.oom;
    ivs_free(&old_gone);
    ivs_free(&db_gone);
    if (oom) {
        snprintf(r->err, sizeof(r->err), "out of memory");
        return -1;
    }
    p->id = p->in_old ? p->old.id : p->db.has_meta ? p->db.id : 0;
    p->verify_id = p->db.has_meta ? p->db.id : p->id;
    p->created_us = p->in_old ? p->old.created_us : p->db.created_us;
    p->epoch = p->in_old ? p->old.epoch : p->db.has_meta ? p->db.epoch : 0;
    if (r->new_epoch) {
        p->new_epoch = true;
        snprintf(p->why, sizeof(p->why), "asked for (--new-epoch)");
    } else if (p->lost.n || p->dropped.n) {
        p->new_epoch = true;
        const ivs_t *l = p->lost.n ? &p->lost : &p->dropped;
        snprintf(p->why, sizeof(p->why), "offsets %" PRIu64 "..%" PRIu64 "%s are lost", l->v[0][0],
                 l->v[0][1], p->lost.n + p->dropped.n > 1 ? " (and more)" : "");
    } else if (p->cursor_max > p->end) {
        p->new_epoch = true;
        snprintf(p->why, sizeof(p->why),
                 "a session acked offset %" PRIu64 " but the last one known is %" PRIu64
                 ": the WAL's tail was lost",
                 p->cursor_max, p->end);
    } else if (p->epoch == 0) {
        p->new_epoch = true;
        snprintf(p->why, sizeof(p->why), "its epoch is unknown (no arq_streams row)");
    }
    if (p->new_epoch)
        p->epoch = random_epoch();
    return 0;
}

/* ---- writing ------------------------------------------------------------------ */

struct wctx {
    rst_t *r;
    struct plan *p;
    rp_batch_t *b;
    uint64_t expect;
    bool bad;
};

static int wrow_cb(const sync_db_row_t *row, void *arg)
{
    struct wctx *w = arg;
    if (row->offset != w->expect ||
        (w->p->verify_id && !rp_row_checksum_ok(row, w->p->verify_id))) {
        snprintf(w->r->err, sizeof(w->r->err),
                 "stream '%s' offset %" PRIu64 ": MySQL's row %s; repair it (arq-replay resync "
                 "from a WAL or backup that has it) or restore with --from-wal",
                 w->p->name, w->expect,
                 row->offset != w->expect ? "is missing" : "does not match its checksum");
        w->bad = true;
        return 1;
    }
    w->expect++;
    return rp_batch_add_row(w->b, row, w->p->name, w->p->len, w->p->id) != 0;
}

static int write_batch(rst_t *r, struct plan *p, rp_batch_t *b)
{
    if (b->n == 0)
        return 0;
    wal_restore_msg_t *m = calloc(b->n, sizeof(*m));
    if (!m) {
        snprintf(r->err, sizeof(r->err), "out of memory");
        return -1;
    }
    for (size_t i = 0; i < b->n; i++) {
        const wal_record_t *x = &b->v[i].r;
        m[i].seq = x->seq;
        m[i].offset = x->offset;
        m[i].msg.stream = p->name;
        m[i].msg.stream_len = p->len;
        m[i].msg.payload = x->payload;
        m[i].msg.payload_len = x->payload_len;
        m[i].msg.producer = x->producer;
        m[i].msg.producer_len = x->producer_len;
        m[i].msg.msgid = x->msgid;
        m[i].msg.msgid_len = x->msgid_len;
        m[i].msg.headers = x->headers;
        m[i].msg.headers_len = x->headers_len;
        m[i].msg.direction = x->direction;
        m[i].msg.timestamp_us = x->timestamp_us;
    }
    int rc = wal_restore_append(r->neu, m, b->n);
    free(m);
    if (rc) {
        snprintf(r->err, sizeof(r->err), "writing stream '%s' offsets %" PRIu64 "..%" PRIu64 ": %s",
                 p->name, b->v[0].r.offset, b->v[b->n - 1].r.offset, wal_strerror(rc));
        return -1;
    }
    p->restored += b->n;
    rp_progress_add(&r->prog, b->n);
    return 0;
}

static int restore_stream(rst_t *r, struct plan *p)
{
    rp_batch_t b = {0};
    uint64_t next = p->first;
    int rc = 0;
    while (next <= p->end && !rc) {
        rp_batch_clear(&b);
        bool old_has = p->in_old && next >= p->old.first_offset && next < p->old.next_offset &&
                       !ivs_contains(&p->old_bad, next);
        if (old_has) {
            uint64_t hi = p->old.next_offset - 1 < p->end ? p->old.next_offset - 1 : p->end;
            uint64_t want = hi - next + 1;
            wal_read_result_t res;
            int wrc = wal_stream_read(r->old, p->name, p->len, next,
                                      want < RP_BATCH_RECORDS ? (uint32_t)want : RP_BATCH_RECORDS,
                                      RP_BATCH_BYTES, rp_batch_cb, &b, &res);
            if (b.oom || (wrc && wrc != WAL_ECORRUPT) || b.n == 0) {
                snprintf(r->err, sizeof(r->err), "reading '%s' of %s at offset %" PRIu64 ": %s",
                         p->name, r->old_dir, next,
                         b.oom ? "out of memory"
                         : wrc ? wal_strerror(wrc)
                               : "no record");
                rc = -1;
                break;
            }
            p->from_old += b.n;
            next += b.n; /* a corrupt one ends the read: MySQL gives it next turn */
        } else {
            /* from MySQL, up to where OLD can take over again */
            uint64_t hi = p->end;
            if (p->in_old && next < p->old.first_offset && p->old.first_offset - 1 < hi)
                hi = p->old.first_offset - 1;
            for (size_t i = 0; i < p->old_bad.n && p->in_old; i++)
                if (p->old_bad.v[i][0] <= next && next <= p->old_bad.v[i][1] &&
                    p->old_bad.v[i][1] < hi)
                    hi = p->old_bad.v[i][1];
            if (!r->db) {
                snprintf(r->err, sizeof(r->err), "stream '%s' offset %" PRIu64 ": no source",
                         p->name, next);
                rc = -1;
                break;
            }
            struct wctx w = {r, p, &b, next, false};
            uint64_t count = 0;
            if (sync_db_rows(r->db, p->name, p->len, next, hi, RP_BATCH_RECORDS, wrow_cb, &w,
                             &count, r->err, sizeof(r->err)) != 0 ||
                w.bad || b.oom) {
                if (b.oom)
                    snprintf(r->err, sizeof(r->err), "out of memory");
                rc = -1;
                break;
            }
            if (count == 0) {
                snprintf(r->err, sizeof(r->err),
                         "stream '%s' offset %" PRIu64 ": MySQL's row is missing (did MySQL "
                         "change during the restore?)",
                         p->name, next);
                rc = -1;
                break;
            }
            p->from_db += b.n;
            next += b.n;
        }
        rc = write_batch(r, p, &b);
    }
    rp_batch_free(&b);
    return rc;
}

/* ---- sessions ------------------------------------------------------------------ */

/* Sessions and their cursors, from OLD with --from-wal, else from MySQL
 * (arq_sessions, arq_cursors), for streams whose epoch is kept. Written in
 * requests of up to SESS_PER_REQUEST sessions: one commit each, not one per
 * session (a standby rebuilding many sessions waits for every commit). */
#define SESS_PER_REQUEST         256
#define SESS_CURSORS_PER_REQUEST 4096

struct waiter {
    pthread_mutex_t mu;
    pthread_cond_t cond;
    bool done;
};

static void waiter_cb(wal_append_t *req, void *arg)
{
    (void)req;
    struct waiter *w = arg;
    pthread_mutex_lock(&w->mu);
    w->done = true;
    pthread_cond_signal(&w->cond);
    pthread_mutex_unlock(&w->mu);
}

struct sess_ctx {
    rst_t *r;
    struct waiter w;
    wal_append_t *req; /* being filled (NULL in a dry run) */
    uint64_t req_sessions, req_cursors;
    uint64_t sessions, cursors; /* committed (in a dry run: would be) */
    int rc;                     /* -1: failed, the reason in r->err */
};

struct sess_cur {
    struct sess_ctx *s;
    const char *session;
    size_t session_len;
};

static int sess_cur_cb(const char *stream, size_t len, uint64_t offset, int64_t updated_us,
                       void *arg)
{
    (void)updated_us;
    struct sess_cur *c = arg;
    struct plan *p = plan_find(c->s->r, stream, len);
    if (!p || p->new_epoch || offset > p->end)
        return 0; /* the client resubscribes with its own offset and epoch */
    if (!c->s->req ||
        wal_append_add_cursor(c->s->req, c->session, c->session_len, stream, len, offset) == 0)
        c->s->req_cursors++;
    return 0;
}

/* Commit the request being filled, and count its sessions and cursors. */
static int sess_flush(struct sess_ctx *s)
{
    int rc = 0;
    if (s->req) {
        rc = wal_append_submit(s->r->neu, s->req);
        if (!rc) {
            pthread_mutex_lock(&s->w.mu);
            while (!s->w.done)
                pthread_cond_wait(&s->w.cond, &s->w.mu);
            pthread_mutex_unlock(&s->w.mu);
            rc = wal_append_status(s->req);
        }
        wal_append_free(s->req);
        s->req = NULL;
        if (rc) {
            snprintf(s->r->err, sizeof(s->r->err), "writing sessions: %s", wal_strerror(rc));
            return -1;
        }
    }
    s->sessions += s->req_sessions;
    s->cursors += s->req_cursors;
    s->req_sessions = s->req_cursors = 0;
    return 0;
}

/* One session with its cursors into the request; 0 or -1 (r->err). */
static int sess_copy(struct sess_ctx *s, const char *session, size_t session_len,
                     const wal_session_t *ws)
{
    rst_t *r = s->r;
    if (!r->dry_run && !s->req) {
        s->w.done = false;
        int rc = wal_append_new(waiter_cb, &s->w, &s->req);
        if (rc) {
            snprintf(r->err, sizeof(r->err), "copying sessions: %s", wal_strerror(rc));
            return -1;
        }
    }
    if (s->req) {
        int rc = wal_append_put_session(s->req, session, session_len, ws);
        if (rc) {
            snprintf(r->err, sizeof(r->err), "copying sessions: %s", wal_strerror(rc));
            return -1;
        }
    }
    struct sess_cur c = {s, session, session_len};
    if (r->old) {
        int rc = wal_session_cursors(r->old, session, session_len, sess_cur_cb, &c);
        if (rc) {
            snprintf(r->err, sizeof(r->err), "reading the cursors of a session of %s: %s",
                     r->old_dir, wal_strerror(rc));
            return -1;
        }
    } else if (sync_db_session_cursors(r->db, session, session_len, sess_cur_cb, &c, r->err,
                                       sizeof(r->err)) != 0) {
        return -1;
    }
    s->req_sessions++;
    if (s->req_sessions >= SESS_PER_REQUEST || s->req_cursors >= SESS_CURSORS_PER_REQUEST)
        return sess_flush(s);
    return 0;
}

static int old_sess_cb(const char *session, size_t session_len, const wal_session_t *ws, void *arg)
{
    struct sess_ctx *s = arg;
    s->rc = sess_copy(s, session, session_len, ws);
    return s->rc != 0;
}

static int db_sess_cb(const sync_db_session_t *x, void *arg)
{
    struct sess_ctx *s = arg;
    if (x->session_len == 0 || x->session_len > WAL_SESSION_MAX ||
        x->owner_len > WAL_PRODUCER_MAX || x->secret_len > WAL_SECRET_MAX) {
        snprintf(s->r->err, sizeof(s->r->err),
                 "arq_sessions holds a row no WAL session can hold (id %zu bytes, owner %zu, "
                 "secret %zu)",
                 x->session_len, x->owner_len, x->secret_len);
        s->rc = -1;
        return 1;
    }
    wal_session_t ws = {.created_us = x->created_us,
                        .seen_us = x->seen_us,
                        .owner_len = (uint8_t)x->owner_len,
                        .secret_len = (uint8_t)x->secret_len};
    memcpy(ws.owner, x->owner, x->owner_len);
    memcpy(ws.secret, x->secret, x->secret_len);
    s->rc = sess_copy(s, x->session, x->session_len, &ws);
    return s->rc != 0;
}

/* Copy (or, in a dry run, count) every session; 0 or -1 (r->err). */
static int copy_sessions(rst_t *r, struct sess_ctx *s)
{
    int rc = 0;
    if (r->old) {
        int wrc = wal_session_list(r->old, old_sess_cb, s);
        if (wrc) {
            snprintf(r->err, sizeof(r->err), "listing the sessions of %s: %s", r->old_dir,
                     wal_strerror(wrc));
            rc = -1;
        }
    } else if (r->db) {
        int drc = sync_db_sessions(r->db, db_sess_cb, s, r->err, sizeof(r->err));
        if (drc == SYNC_ESCHEMA) {
            rp_err("note: %s: no sessions to restore", r->err);
            r->err[0] = 0;
        } else if (drc) {
            rc = -1;
        }
    }
    if (!rc && s->rc)
        rc = -1;
    if (!rc)
        rc = sess_flush(s);
    if (rc && s->req) {
        wal_append_free(s->req);
        s->req = NULL;
    }
    return rc;
}

/* ---- the command -------------------------------------------------------------- */

static int restore_opt(int c, const char *arg, void *ctx)
{
    rst_t *r = ctx;
    switch (c) {
    case RP_OPT_FIRST_FREE:
        r->old_dir = arg;
        return 0;
    case RP_OPT_FIRST_FREE + 1:
        r->new_epoch = true;
        return 0;
    case RP_OPT_FIRST_FREE + 2:
        if (replay_parse_u64(arg, strlen(arg), &r->tail) != 0 || r->tail == 0) {
            rp_err("restore: --tail takes a number of offsets >= 1, not '%s'", arg);
            return RP_USAGE;
        }
        return 0;
    case RP_OPT_FIRST_FREE + 3:
        r->dry_run = true;
        return 0;
    default:
        return RP_USAGE;
    }
}

static void remove_new(const char *dir, bool created)
{
    char path[4096];
    snprintf(path, sizeof(path), "%s/data.mdb", dir);
    (void)unlink(path);
    snprintf(path, sizeof(path), "%s/lock.mdb", dir);
    (void)unlink(path);
    if (created)
        (void)rmdir(dir);
}

static json_t *ivs_json(const ivs_t *s)
{
    json_t *a = json_array();
    for (size_t i = 0; i < s->n; i++) {
        json_t *x = json_array();
        json_array_append_new(x, json_integer((json_int_t)s->v[i][0]));
        json_array_append_new(x, json_integer((json_int_t)s->v[i][1]));
        json_array_append_new(a, x);
    }
    return a;
}

int rp_cmd_restore(rp_opts_t *o, int argc, char **argv)
{
    static const struct option extra[] = {
        {"from-wal", required_argument, NULL, RP_OPT_FIRST_FREE},
        {"new-epoch", no_argument, NULL, RP_OPT_FIRST_FREE + 1},
        {"tail", required_argument, NULL, RP_OPT_FIRST_FREE + 2},
        {"dry-run", no_argument, NULL, RP_OPT_FIRST_FREE + 3},
        {NULL, 0, NULL, 0},
    };
    rst_t r = {.o = o};
    struct sess_ctx sess = {.r = &r, .w = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER}};
    int oi;
    int rc = rp_parse(o, argc, argv, restore_usage, extra, restore_opt, &r, &oi);
    if (rc)
        return rc < 0 ? RP_OK : rc;
    if (oi != argc) {
        rp_err("restore: unexpected argument '%s'", argv[oi]);
        return RP_USAGE;
    }
    if (!o->data_dir || !*o->data_dir) {
        rp_err("restore: --data-dir NEW is required (the directory to build)");
        return RP_USAGE;
    }
    if (!r.old_dir && (!o->db_url || !*o->db_url)) {
        rp_err("restore: needs a source: --database-url URL (or DATABASE_URL) and/or "
               "--from-wal OLD");
        return RP_USAGE;
    }
    if (r.old_dir && !strcmp(r.old_dir, o->data_dir)) {
        rp_err("restore: --from-wal and --data-dir must differ (build a new directory)");
        return RP_USAGE;
    }
    bool created = false, built = false, any_loss = false;
    struct stat st;
    if (stat(o->data_dir, &st) == 0) {
        DIR *d = S_ISDIR(st.st_mode) ? opendir(o->data_dir) : NULL;
        bool empty = d != NULL;
        struct dirent *e;
        while (d && (e = readdir(d)))
            if (strcmp(e->d_name, ".") && strcmp(e->d_name, ".."))
                empty = false;
        if (d)
            closedir(d);
        if (!empty) {
            rp_err("restore: '%s' exists and is not an empty directory: refusing to write there",
                   o->data_dir);
            return RP_USAGE;
        }
    } else if (errno != ENOENT) {
        rp_err("restore: '%s': %s", o->data_dir, strerror(errno));
        return RP_PROBLEMS;
    }
    if (r.old_dir) {
        uint64_t folded = 0;
        if (wal_fold_journal(r.old_dir, &folded, r.err, sizeof(r.err)) == 0 && folded)
            rp_err(
                "note: the journal in '%s' held %llu acknowledged batches not yet in LMDB: folded "
                "them in first",
                r.old_dir, (unsigned long long)folded);
        r.err[0] = 0;
        wal_options_t wo = {.dir = r.old_dir, .read_only = 1};
        int wrc = wal_open(&wo, NULL, &r.old, r.err, sizeof(r.err));
        if (wrc) {
            rp_err("restore: cannot open --from-wal '%s': %s", r.old_dir,
                   r.err[0] ? r.err : wal_strerror(wrc));
            return RP_PROBLEMS;
        }
    }
    if ((rc = rp_open_db(o, &r.db)) != 0)
        goto out;
    /* Plan: the streams of both sources, merged by name. */
    if (r.old) {
        int wrc = wal_stream_list(r.old, old_list_cb, &r);
        if (wrc || r.oom) {
            snprintf(r.err, sizeof(r.err), "listing the streams of %s: %s", r.old_dir,
                     r.oom ? "out of memory" : wal_strerror(wrc));
            goto fail;
        }
        qsort(r.v, r.n, sizeof(*r.v), plan_cmp);
        r.n_old = r.n;
    }
    uint64_t max_seq = 0;
    if (r.db) {
        if (sync_db_watermark(r.db, &r.wm, NULL, r.err, sizeof(r.err)) != 0 ||
            sync_db_streams(r.db, db_list_cb, &r, r.err, sizeof(r.err)) != 0)
            goto fail;
        if (r.oom) {
            snprintf(r.err, sizeof(r.err), "out of memory");
            goto fail;
        }
        qsort(r.v, r.n, sizeof(*r.v), plan_cmp);
        if (sync_db_cursor_max(r.db, cursor_cb, &r, r.err, sizeof(r.err)) != 0)
            goto fail;
        for (size_t i = 0; i < r.n; i++)
            if (r.v[i].db.max_seq > max_seq)
                max_seq = r.v[i].db.max_seq;
    }
    wal_stats_t old_stats = {0};
    if (r.old && wal_stats_get(r.old, &old_stats) == 0) {
        rp_progress_start(&r.prog, o, "scanning", old_stats.next_seq - old_stats.first_seq);
        for (size_t i = 0; i < r.n; i++)
            if (r.v[i].in_old && scan_old(&r, &r.v[i]) != 0)
                goto fail;
        rp_progress_end(&r.prog);
    }
    uint64_t total = 0;
    for (size_t i = 0; i < r.n; i++) {
        if (decide(&r, &r.v[i]) != 0)
            goto fail;
        if (r.v[i].end >= r.v[i].first)
            total += r.v[i].end - r.v[i].first + 1;
    }
    /* Stream ids must stay unique: a clash (never from one history) gets a
     * fresh id; its records then cannot be checked against MySQL's sums. */
    for (size_t i = 0; i < r.n; i++)
        for (size_t j = 0; j < i && r.v[i].id; j++)
            if (r.v[j].id == r.v[i].id) {
                r.v[i].id = 0;
                break;
            }
    uint64_t next_seq = old_stats.next_seq;
    if (r.db && r.wm + 1 > next_seq)
        next_seq = r.wm + 1;
    if (max_seq + 1 > next_seq)
        next_seq = max_seq + 1;

    if (!r.dry_run) {
        if (stat(o->data_dir, &st) != 0) {
            if (mkdir(o->data_dir, 0700) != 0) {
                snprintf(r.err, sizeof(r.err), "cannot create '%s': %s", o->data_dir,
                         strerror(errno));
                goto fail;
            }
            created = true;
        }
        wal_options_t wo = {.dir = o->data_dir};
        int wrc = wal_open(&wo, NULL, &r.neu, r.err, sizeof(r.err));
        if (wrc) {
            if (!r.err[0])
                snprintf(r.err, sizeof(r.err), "opening '%s': %s", o->data_dir, wal_strerror(wrc));
            goto fail;
        }
        for (size_t i = 0; i < r.n; i++) {
            struct plan *p = &r.v[i];
            wal_restore_stream_t rs = {.stream = p->name,
                                       .stream_len = p->len,
                                       .id = p->id,
                                       .epoch = p->epoch,
                                       .first_offset = p->first,
                                       .created_us = p->created_us};
            wrc = wal_restore_stream(r.neu, &rs);
            if (wrc) {
                snprintf(r.err, sizeof(r.err), "creating stream '%s': %s", p->name,
                         wal_strerror(wrc));
                goto fail;
            }
            wal_stream_info_t ni;
            if (wal_stream_get(r.neu, p->name, p->len, &ni) == 0)
                p->id = ni.id;
        }
        rp_progress_start(&r.prog, o, "restoring", total);
        for (size_t i = 0; i < r.n; i++)
            if (restore_stream(&r, &r.v[i]) != 0) {
                rp_progress_end(&r.prog);
                goto fail;
            }
        rp_progress_end(&r.prog);
        wrc = wal_restore_seq(r.neu, next_seq);
        if (wrc) {
            snprintf(r.err, sizeof(r.err), "setting the next sequence: %s", wal_strerror(wrc));
            goto fail;
        }
        if (copy_sessions(&r, &sess) != 0)
            goto fail;
        wal_close(r.neu);
        r.neu = NULL;
        built = true;
        /* MySQL learns the new epochs (the WAL is written: a failure here
         * is reported, and the next restore or verify says so too). */
        for (size_t i = 0; i < r.n && r.db; i++) {
            struct plan *p = &r.v[i];
            if (!p->new_epoch && p->db.has_meta && p->db.id == p->id)
                continue;
            if (sync_db_stream_put(r.db, p->name, p->len, p->id, p->epoch, p->created_us, r.err,
                                   sizeof(r.err)) != 0) {
                rp_err("restore: the WAL is built, but updating arq_streams for '%s' failed: %s",
                       p->name, r.err);
                rc = RP_PROBLEMS;
            }
        }
    }
    if (r.dry_run && copy_sessions(&r, &sess) != 0)
        goto fail;
    /* The report. */
    json_t *arr = o->json ? json_array() : NULL;
    uint64_t restored = 0, n_new = 0;
    for (size_t i = 0; i < r.n; i++) {
        struct plan *p = &r.v[i];
        uint64_t count = p->end >= p->first ? p->end - p->first + 1 : 0;
        restored += r.dry_run ? count : p->restored;
        if (p->new_epoch)
            n_new++;
        if (p->lost.n || p->dropped.n || (p->cursor_max > p->end && !r.new_epoch))
            any_loss = true;
        if (arr) {
            json_t *j = json_object();
            json_object_set_new(j, "stream", json_stringn(p->name, p->len));
            json_object_set_new(j, "first", json_integer((json_int_t)p->first));
            json_object_set_new(j, "last", json_integer((json_int_t)p->end));
            json_object_set_new(j, "records", json_integer((json_int_t)count));
            json_object_set_new(j, "from_old_wal", json_integer((json_int_t)p->from_old));
            json_object_set_new(j, "from_mysql", json_integer((json_int_t)p->from_db));
            json_object_set_new(j, "epoch", rp_json_u64s(p->epoch));
            json_object_set_new(j, "new_epoch", json_boolean(p->new_epoch));
            if (p->new_epoch)
                json_object_set_new(j, "why", json_string(p->why));
            json_object_set_new(j, "lost", ivs_json(&p->lost));
            json_object_set_new(j, "dropped", ivs_json(&p->dropped));
            json_object_set_new(j, "cold", ivs_json(&p->cold));
            json_array_append_new(arr, j);
            continue;
        }
        printf("stream '%s': ", p->name);
        if (count)
            printf("offsets %" PRIu64 "..%" PRIu64 " %s", p->first, p->end,
                   r.dry_run ? "to restore" : "restored");
        else
            printf("no records to restore (next offset %" PRIu64 ")", p->first);
        if (!r.dry_run && count)
            printf(" (%" PRIu64 " from the old WAL, %" PRIu64 " from MySQL)", p->from_old,
                   p->from_db);
        if (p->new_epoch)
            printf("; NEW EPOCH %" PRIu64 ": %s\n", p->epoch, p->why);
        else
            printf("; epoch %" PRIu64 " kept\n", p->epoch);
        for (size_t k = 0; k < p->cold.n; k++)
            printf("  offsets %" PRIu64 "..%" PRIu64 " stay in MySQL (the cold tier serves them)\n",
                   p->cold.v[k][0], p->cold.v[k][1]);
        for (size_t k = 0; k < p->dropped.n; k++)
            printf("  offsets %" PRIu64 "..%" PRIu64 " are DROPPED: readable in the old WAL, but "
                   "before a lost offset and not in MySQL; subscribers get a gap report\n",
                   p->dropped.v[k][0], p->dropped.v[k][1]);
        for (size_t k = 0; k < p->lost.n; k++)
            printf("  offsets %" PRIu64 "..%" PRIu64
                   " are LOST: in no source; subscribers get a gap report\n",
                   p->lost.v[k][0], p->lost.v[k][1]);
    }
    if (arr) {
        json_t *j = json_object();
        json_object_set_new(j, "ok", json_boolean(!any_loss && !rc));
        json_object_set_new(j, "built", json_boolean(built));
        json_object_set_new(j, "dry_run", json_boolean(r.dry_run));
        json_object_set_new(j, "data_dir", json_string(o->data_dir));
        json_object_set_new(j, "next_seq", json_integer((json_int_t)next_seq));
        json_object_set_new(j, "records", json_integer((json_int_t)restored));
        json_object_set_new(j, "new_epochs", json_integer((json_int_t)n_new));
        json_object_set_new(j, "sessions", json_integer((json_int_t)sess.sessions));
        json_object_set_new(j, "cursors", json_integer((json_int_t)sess.cursors));
        json_object_set_new(j, "streams", arr);
        if (rp_json_print(j) != 0)
            rc = RP_PROBLEMS;
    } else {
        printf("%s %zu streams, %" PRIu64 " records into '%s'; next sequence %" PRIu64 "; %" PRIu64
               " new epoch%s\n",
               r.dry_run ? "would restore" : "restored", r.n, restored, o->data_dir, next_seq,
               n_new, n_new == 1 ? "" : "s");
        printf("%s %" PRIu64 " session%s with %" PRIu64 " cursor%s from %s\n",
               r.dry_run ? "would restore" : "restored", sess.sessions,
               sess.sessions == 1 ? "" : "s", sess.cursors, sess.cursors == 1 ? "" : "s",
               r.old ? "the old WAL" : "MySQL");
        if (!r.old && !r.new_epoch)
            printf("note: MySQL cannot show messages that were acknowledged but not yet synced "
                   "when the WAL was lost; if arq_sync_lag_records was not 0 then (or you do not "
                   "know), run again into an empty directory with --new-epoch\n");
    }
    if (!rc && any_loss)
        rc = RP_PROBLEMS;
    goto out;
fail:
    rp_progress_end(&r.prog);
    rp_err("restore: %s", r.err);
    rc = RP_PROBLEMS;
    wal_close(r.neu);
    r.neu = NULL;
    if (!r.dry_run && !built)
        remove_new(o->data_dir, created);
out:
    wal_close(r.neu);
    wal_close(r.old);
    sync_db_close(r.db);
    for (size_t i = 0; i < r.n; i++) {
        free(r.v[i].name);
        ivs_free(&r.v[i].old_bad);
        ivs_free(&r.v[i].lost);
        ivs_free(&r.v[i].cold);
        ivs_free(&r.v[i].dropped);
    }
    free(r.v);
    pthread_mutex_destroy(&sess.w.mu);
    pthread_cond_destroy(&sess.w.cond);
    return rc;
}

/*
 * arq_replay_verify.c - arq-replay verify (checksums, offset continuity,
 * WAL <-> MySQL agreement, as exact ranges) and resync (write a range of
 * the WAL to MySQL again, idempotently).
 */
#include <getopt.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "arq_replay.h"

/* ---- problem ranges ----------------------------------------------------------- */

enum vf_kind {
    VF_CORRUPT = 0,   /* WAL record fails checksum/layout */
    VF_HOLE,          /* no index entry for an offset inside the stream */
    VF_ORDER,         /* the log has a stream's offsets out of order */
    VF_LOG_CORRUPT,   /* a log record that fails its checksum, stream unknown */
    VF_MISSING,       /* in the WAL and synced, not in MySQL */
    VF_DIFFERENT,     /* MySQL's row differs from the WAL's record */
    VF_EXTRA,         /* in MySQL, not in the WAL (beyond its end, or no such stream) */
    VF_LOST,          /* dropped from the WAL and not in MySQL */
    VF_MYSQL_CORRUPT, /* a MySQL row (no WAL copy) does not match its checksum */
    VF_EPOCH,         /* MySQL's arq_streams has another epoch */
    VF_KINDS
};

static const char *const vf_names[VF_KINDS] = {
    "corrupt",   "hole",  "order", "log_corrupt",   "missing",
    "different", "extra", "lost",  "mysql_corrupt", "epoch",
};

#define VF_MYSQL_COPY (1u << 16) /* with VF_CORRUPT: MySQL holds a good copy */

struct vf_run {
    bool open;
    uint64_t from, to, seq;
    unsigned fields;
};

typedef struct vf {
    rp_opts_t *o;
    wal_t *wal;
    sync_db_t *db;
    bool cold;
    bool have_wm;
    uint64_t wm;
    const char *stream; /* the stream being checked */
    size_t stream_len;
    struct vf_run runs[VF_KINDS];
    json_t *problems;
    uint64_t n_problems, records, compared, pending, cold_rows;
    struct vf_bad {
        uint64_t seq, offset;
        uint32_t stream_id;
    } * bad; /* corrupt records the stream walk reported */
    size_t n_bad, cap_bad;
    rp_progress_t prog;
    rp_batch_t b;
    size_t cmp_idx;
    char err[512];
} vf_t;

static void vf_emit(vf_t *v, enum vf_kind k, const struct vf_run *r, const char *detail)
{
    v->n_problems++;
    char fields[128] = "";
    sync_db_diff_names(r->fields & 0xffff, fields, sizeof(fields));
    if (v->o->json) {
        json_t *j = json_object();
        json_object_set_new(j, "kind", json_string(vf_names[k]));
        if (v->stream)
            json_object_set_new(j, "stream", json_stringn(v->stream, v->stream_len));
        if (k != VF_LOG_CORRUPT && k != VF_EPOCH) {
            json_object_set_new(j, "from", json_integer((json_int_t)r->from));
            json_object_set_new(j, "to", json_integer((json_int_t)r->to));
        }
        if (r->seq)
            json_object_set_new(j, "seq", json_integer((json_int_t)r->seq));
        if (k == VF_DIFFERENT) {
            json_t *arr = json_array();
            for (char *p = fields, *tok; (tok = strtok_r(p, ",", &p));)
                json_array_append_new(arr, json_string(tok));
            json_object_set_new(j, "fields", arr);
        }
        if (k == VF_CORRUPT)
            json_object_set_new(j, "mysql_copy", json_boolean(r->fields & VF_MYSQL_COPY));
        json_object_set_new(j, "detail", json_string(detail));
        json_array_append_new(v->problems, j);
        return;
    }
    char rng[64];
    if (r->from == r->to)
        snprintf(rng, sizeof(rng), "offset %" PRIu64, r->from);
    else
        snprintf(rng, sizeof(rng), "offsets %" PRIu64 "..%" PRIu64, r->from, r->to);
    if (k == VF_LOG_CORRUPT)
        printf("%-13s seq %" PRIu64 ": %s\n", "LOG_CORRUPT", r->seq, detail);
    else if (k == VF_EPOCH)
        printf("%-13s stream '%.*s': %s\n", "EPOCH", (int)v->stream_len, v->stream, detail);
    else {
        char up[32];
        size_t i = 0;
        for (; vf_names[k][i] && i + 1 < sizeof(up); i++)
            up[i] = (char)(vf_names[k][i] >= 'a' && vf_names[k][i] <= 'z' ? vf_names[k][i] - 32
                                                                          : vf_names[k][i]);
        up[i] = 0;
        printf("%-13s stream '%.*s' %s: %s\n", up, (int)v->stream_len, v->stream, rng, detail);
    }
}

static void vf_flush_kind(vf_t *v, enum vf_kind k)
{
    struct vf_run *r = &v->runs[k];
    if (!r->open)
        return;
    r->open = false;
    char detail[512], fields[128];
    char rng[64];
    snprintf(rng, sizeof(rng), "%" PRIu64 "..%" PRIu64, r->from, r->to);
    switch (k) {
    case VF_CORRUPT:
        snprintf(detail, sizeof(detail),
                 "record fails its checksum or layout (first bad seq %" PRIu64 "); %s", r->seq,
                 r->fields & VF_MYSQL_COPY
                     ? "MySQL holds a good copy: rebuild with arq-replay restore --from-wal"
                 : v->db ? "no good copy in MySQL: the message is lost unless a backup holds it"
                         : "MySQL not checked (no database URL) for a good copy");
        break;
    case VF_HOLE:
        snprintf(detail, sizeof(detail), "no index entry: the stream's offsets are not contiguous");
        break;
    case VF_ORDER:
        snprintf(detail, sizeof(detail),
                 "the log holds these offsets out of order (at seq %" PRIu64 ")", r->seq);
        break;
    case VF_LOG_CORRUPT:
        snprintf(detail, sizeof(detail), "log record fails its checksum or layout");
        break;
    case VF_MISSING:
        snprintf(detail, sizeof(detail),
                 "in the WAL and below the sync watermark, but not in MySQL (fix: arq-replay "
                 "resync %.*s --range %s)",
                 (int)v->stream_len, v->stream, rng);
        break;
    case VF_DIFFERENT:
        sync_db_diff_names(r->fields, fields, sizeof(fields));
        snprintf(detail, sizeof(detail),
                 "MySQL's rows differ from the WAL in %s (fix: arq-replay resync %.*s --range %s)",
                 fields, (int)v->stream_len, v->stream, rng);
        break;
    case VF_EXTRA:
        snprintf(detail, sizeof(detail),
                 "rows in MySQL that the WAL does not have (the WAL is behind MySQL: rebuild it "
                 "with arq-replay restore --from-wal)");
        break;
    case VF_LOST:
        snprintf(detail, sizeof(detail),
                 "no longer in the WAL (retention) and not in MySQL: subscribers get a gap");
        break;
    case VF_MYSQL_CORRUPT:
        snprintf(detail, sizeof(detail),
                 "MySQL rows (no longer in the WAL) do not match their checksum (first bad seq "
                 "%" PRIu64 ")",
                 r->seq);
        break;
    default:
        detail[0] = 0;
    }
    vf_emit(v, k, r, detail);
}

static void vf_flush_all(vf_t *v)
{
    for (int k = 0; k < VF_KINDS; k++)
        vf_flush_kind(v, (enum vf_kind)k);
}

static void vf_add(vf_t *v, enum vf_kind k, uint64_t from, uint64_t to, uint64_t seq,
                   unsigned fields)
{
    struct vf_run *r = &v->runs[k];
    if (r->open && from == r->to + 1 && fields == r->fields) {
        r->to = to;
        return;
    }
    vf_flush_kind(v, k);
    r->open = true;
    r->from = from;
    r->to = to;
    r->seq = seq;
    r->fields = fields;
}

static void vf_bad_seq(vf_t *v, uint64_t seq, uint32_t stream_id, uint64_t offset)
{
    if (!seq)
        return;
    if (v->n_bad == v->cap_bad) {
        size_t cap = v->cap_bad ? v->cap_bad * 2 : 16;
        struct vf_bad *n = realloc(v->bad, cap * sizeof(*n));
        if (!n)
            return;
        v->bad = n;
        v->cap_bad = cap;
    }
    v->bad[v->n_bad++] = (struct vf_bad){seq, offset, stream_id};
}

static const struct vf_bad *vf_known_bad(const vf_t *v, uint64_t seq)
{
    for (size_t i = 0; i < v->n_bad; i++)
        if (v->bad[i].seq == seq)
            return &v->bad[i];
    return NULL;
}

/* ---- the stream walk ------------------------------------------------------------ */

static void vf_unmatched(vf_t *v, const wal_record_t *r)
{
    if (v->have_wm && r->seq <= v->wm)
        vf_add(v, VF_MISSING, r->offset, r->offset, r->seq, 0);
    else
        v->pending++;
}

static int cmp_row_cb(const sync_db_row_t *row, void *arg)
{
    vf_t *v = arg;
    while (v->cmp_idx < v->b.n && v->b.v[v->cmp_idx].r.offset < row->offset)
        vf_unmatched(v, &v->b.v[v->cmp_idx++].r);
    if (v->cmp_idx < v->b.n && v->b.v[v->cmp_idx].r.offset == row->offset) {
        const wal_record_t *r = &v->b.v[v->cmp_idx++].r;
        v->compared++;
        unsigned diff = sync_db_row_diff(row, r);
        if (diff)
            vf_add(v, VF_DIFFERENT, r->offset, r->offset, r->seq, diff);
    }
    return 0;
}

/* Compare a batch of WAL records (contiguous offsets) with MySQL. */
static int vf_compare(vf_t *v)
{
    if (!v->db || v->b.n == 0)
        return 0;
    v->cmp_idx = 0;
    if (sync_db_rows(v->db, v->stream, v->stream_len, v->b.v[0].r.offset,
                     v->b.v[v->b.n - 1].r.offset, 0, cmp_row_cb, v, NULL, v->err,
                     sizeof(v->err)) != 0)
        return -1;
    while (v->cmp_idx < v->b.n)
        vf_unmatched(v, &v->b.v[v->cmp_idx++].r);
    return 0;
}

struct copy_ctx {
    uint32_t id;
    bool good;
};

static int copy_cb(const sync_db_row_t *row, void *arg)
{
    struct copy_ctx *c = arg;
    c->good = rp_row_checksum_ok(row, c->id);
    return 1;
}

static int extra_cb(const sync_db_row_t *row, void *arg)
{
    vf_t *v = arg;
    vf_add(v, VF_EXTRA, row->offset, row->offset, row->seq, 0);
    return 0;
}

struct cold_ctx {
    vf_t *v;
    uint32_t id;
};

static int cold_cb(const sync_db_row_t *row, void *arg)
{
    struct cold_ctx *c = arg;
    c->v->cold_rows++;
    rp_progress_add(&c->v->prog, 1);
    if (!rp_row_checksum_ok(row, c->id))
        vf_add(c->v, VF_MYSQL_CORRUPT, row->offset, row->offset, row->seq, 0);
    return 0;
}

static int lost_cb(uint64_t from, uint64_t to, void *arg)
{
    vf_add(arg, VF_LOST, from, to, 0, 0);
    return 0;
}

static int vf_stream(vf_t *v, const char *name, size_t len, const wal_stream_info_t *info0)
{
    v->stream = name;
    v->stream_len = len;
    uint64_t next = info0->first_offset, first_read = 0;
    for (;;) {
        rp_batch_clear(&v->b);
        wal_read_result_t res;
        int rc = wal_stream_read(v->wal, name, len, next, RP_BATCH_RECORDS, RP_BATCH_BYTES,
                                 rp_batch_cb, &v->b, &res);
        if (v->b.oom) {
            snprintf(v->err, sizeof(v->err), "out of memory");
            return -1;
        }
        if (rc == WAL_ETRUNCATED) {
            next = res.next; /* retention ran meanwhile */
            continue;
        }
        if (rc && rc != WAL_ECORRUPT) {
            snprintf(v->err, sizeof(v->err), "reading stream '%.*s' at offset %" PRIu64 ": %s",
                     (int)len, name, next, wal_strerror(rc));
            return -1;
        }
        if (!first_read && (v->b.n || rc == WAL_ECORRUPT))
            first_read = next;
        v->records += v->b.n;
        rp_progress_add(&v->prog, v->b.n);
        if (vf_compare(v) != 0)
            return -1;
        if (rc == WAL_ECORRUPT) {
            uint64_t bad = res.bad_offset;
            if (res.bad_seq == 0) {
                vf_add(v, VF_HOLE, bad, bad, 0, 0);
            } else {
                vf_bad_seq(v, res.bad_seq, info0->id, bad);
                struct copy_ctx c = {info0->id, false};
                if (v->db && sync_db_rows(v->db, name, len, bad, bad, 1, copy_cb, &c, NULL, v->err,
                                          sizeof(v->err)) != 0)
                    return -1;
                vf_add(v, VF_CORRUPT, bad, bad, res.bad_seq, c.good ? VF_MYSQL_COPY : 0);
            }
            rp_progress_add(&v->prog, 1);
            next = bad + 1;
            continue;
        }
        if (res.count == 0)
            break;
        next = res.next;
    }
    if (!v->db) {
        vf_flush_all(v);
        return 0;
    }
    /* Below what the WAL holds: MySQL alone (the cold tier) must have it. */
    uint64_t cold_hi = (first_read ? first_read : next) - 1;
    if (cold_hi >= 1) {
        if (sync_db_holes(v->db, name, len, 1, cold_hi, lost_cb, v, v->err, sizeof(v->err)) != 0)
            return -1;
        if (v->cold) {
            struct cold_ctx c = {v, info0->id};
            if (sync_db_rows(v->db, name, len, 1, cold_hi, 0, cold_cb, &c, NULL, v->err,
                             sizeof(v->err)) != 0)
                return -1;
        }
    }
    /* Beyond the WAL's last offset: rows MySQL should not have. */
    wal_stream_info_t now;
    sync_db_stream_t ds;
    if (wal_stream_get(v->wal, name, len, &now) != 0)
        now = *info0;
    if (sync_db_stream_get(v->db, name, len, &ds, v->err, sizeof(v->err)) != 0)
        return -1;
    if (ds.rows && ds.max_offset >= now.next_offset &&
        sync_db_rows(v->db, name, len, now.next_offset, ds.max_offset, 0, extra_cb, v, NULL, v->err,
                     sizeof(v->err)) != 0)
        return -1;
    vf_flush_all(v);
    if (ds.has_meta && ds.epoch != now.epoch) {
        char detail[256];
        snprintf(detail, sizeof(detail),
                 "the WAL's epoch is %" PRIu64 ", MySQL's arq_streams says %" PRIu64
                 ": MySQL's rows may belong to another history of the stream",
                 now.epoch, ds.epoch);
        struct vf_run r = {0};
        vf_emit(v, VF_EPOCH, &r, detail);
    }
    return 0;
}

/* ---- the log walk: every record, also those no stream index reaches ------- */

struct lw_stream {
    char *name;
    size_t len;
    uint64_t last; /* last offset seen in the walk (0: none yet) */
    uint64_t last_seq;
};

struct lw_ctx {
    vf_t *v;
    struct lw_stream *by_id;
    size_t cap;
    bool oom;
};

static int lw_list_cb(const wal_stream_info_t *info, void *arg)
{
    struct lw_ctx *x = arg;
    if (info->id >= x->cap) {
        size_t cap = x->cap ? x->cap : 64;
        while (cap <= info->id)
            cap *= 2;
        struct lw_stream *n = realloc(x->by_id, cap * sizeof(*n));
        if (!n) {
            x->oom = true;
            return 1;
        }
        memset(n + x->cap, 0, (cap - x->cap) * sizeof(*n));
        x->by_id = n;
        x->cap = cap;
    }
    struct lw_stream *s = &x->by_id[info->id];
    s->name = malloc(info->name_len ? info->name_len : 1);
    if (!s->name) {
        x->oom = true;
        return 1;
    }
    memcpy(s->name, info->name, info->name_len);
    s->len = info->name_len;
    return 0;
}

static int count_rec_cb(const wal_record_t *r, void *arg)
{
    (void)r;
    (*(uint64_t *)arg)++;
    return 1;
}

static int lw_rec_cb(const wal_record_t *r, void *arg)
{
    struct lw_ctx *x = arg;
    rp_progress_add(&x->v->prog, 1);
    if (r->stream_id >= x->cap || !x->by_id[r->stream_id].name)
        return 0; /* a stream created after the listing */
    struct lw_stream *s = &x->by_id[r->stream_id];
    if (s->last && r->offset != s->last + 1) {
        /* Retention dropping the records between our reads looks the same:
         * the offset after the last one seen must be gone from the WAL. */
        uint64_t n = 0;
        wal_read_result_t res;
        int rc =
            wal_stream_read(x->v->wal, s->name, s->len, s->last + 1, 1, 1, count_rec_cb, &n, &res);
        if (rc != WAL_ETRUNCATED) {
            x->v->stream = s->name;
            x->v->stream_len = s->len;
            struct vf_run run = {.from = r->offset, .to = r->offset, .seq = r->seq};
            char detail[256];
            snprintf(detail, sizeof(detail),
                     "the log holds offset %" PRIu64 " at seq %" PRIu64
                     " right after offset %" PRIu64 " (seq %" PRIu64 ")",
                     r->offset, r->seq, s->last, s->last_seq);
            vf_emit(x->v, VF_ORDER, &run, detail);
        }
    }
    s->last = r->offset;
    s->last_seq = r->seq;
    return 0;
}

static int vf_log_walk(vf_t *v)
{
    struct lw_ctx x = {v, NULL, 0, false};
    int rc = wal_stream_list(v->wal, lw_list_cb, &x);
    if (rc || x.oom) {
        snprintf(v->err, sizeof(v->err), "listing streams: %s",
                 x.oom ? "out of memory" : wal_strerror(rc));
        rc = -1;
        goto out;
    }
    uint64_t from = 1;
    for (;;) {
        wal_read_result_t res;
        rc = wal_log_read(v->wal, from, 10000, 64u << 20, lw_rec_cb, &x, &res);
        if (rc == WAL_ECORRUPT) {
            const struct vf_bad *kb = vf_known_bad(v, res.bad_seq);
            if (kb && kb->stream_id < x.cap && x.by_id[kb->stream_id].name) {
                /* reported by the stream walk; its offset counts as seen */
                x.by_id[kb->stream_id].last = kb->offset;
                x.by_id[kb->stream_id].last_seq = kb->seq;
            } else if (!kb) {
                v->stream = NULL;
                v->stream_len = 0;
                struct vf_run run = {.seq = res.bad_seq};
                vf_emit(v, VF_LOG_CORRUPT, &run,
                        res.bad_offset ? "log record names a stream id the WAL does not know"
                                       : "log record fails its checksum or layout");
            }
            from = res.bad_seq + 1;
            continue;
        }
        if (rc) {
            snprintf(v->err, sizeof(v->err), "reading the log at seq %" PRIu64 ": %s", from,
                     wal_strerror(rc));
            rc = -1;
            goto out;
        }
        if (res.count == 0)
            break;
        from = res.next;
    }
out:
    for (size_t i = 0; i < x.cap; i++)
        free(x.by_id[i].name);
    free(x.by_id);
    return rc;
}

/* ---- verify ------------------------------------------------------------------ */

static const char verify_usage[] =
    "usage: arq-replay verify [--data-dir DIR] [--database-url URL] [--cold] [STREAM...]\n"
    "\n"
    "Check the WAL (and, with a database URL, its MySQL copy) and report every\n"
    "problem as an exact range of offsets:\n"
    "  - every record's checksum and layout (corrupt), the offsets of each stream\n"
    "    contiguous (hole) and in order in the log (order), log records no stream\n"
    "    reaches (log_corrupt);\n"
    "  - with MySQL: records below the sync watermark that MySQL lacks (missing),\n"
    "    rows that differ from the WAL in any column (different), rows beyond the\n"
    "    WAL (extra), offsets dropped from the WAL that MySQL lacks too (lost), a\n"
    "    stream epoch that differs (epoch). Records after the watermark are not\n"
    "    problems: the drain has not reached them yet.\n"
    "  --cold   also check MySQL's rows below the WAL against their checksums\n"
    "           (reads every one of them)\n"
    "STREAM... limits the check to these streams (the whole-log walk is skipped).\n"
    "Works next to a running arqd.\n"
    "\n"
    "Exit status: 0 only when all is well, 1 problems found (or a read failed),\n"
    "2 usage.\n";

static int verify_opt(int c, const char *arg, void *ctx)
{
    (void)arg;
    if (c != RP_OPT_FIRST_FREE)
        return RP_USAGE;
    ((vf_t *)ctx)->cold = true;
    return 0;
}

struct vf_streams {
    char **names;
    size_t *lens;
    wal_stream_info_t *infos;
    size_t n, cap;
    bool oom;
};

static int vf_list_cb(const wal_stream_info_t *info, void *arg)
{
    struct vf_streams *s = arg;
    if (s->n == s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 32;
        char **nn = realloc(s->names, cap * sizeof(*nn));
        size_t *nl = nn ? realloc(s->lens, cap * sizeof(*nl)) : NULL;
        wal_stream_info_t *ni = nl ? realloc(s->infos, cap * sizeof(*ni)) : NULL;
        if (nn)
            s->names = nn;
        if (nl)
            s->lens = nl;
        if (!ni) {
            s->oom = true;
            return 1;
        }
        s->infos = ni;
        s->cap = cap;
    }
    s->names[s->n] = malloc(info->name_len + 1);
    if (!s->names[s->n]) {
        s->oom = true;
        return 1;
    }
    memcpy(s->names[s->n], info->name, info->name_len);
    s->names[s->n][info->name_len] = 0;
    s->lens[s->n] = info->name_len;
    s->infos[s->n] = *info;
    s->infos[s->n].name = NULL;
    s->n++;
    return 0;
}

static bool wanted(char **argv, int argc, const char *name, size_t len)
{
    if (argc == 0)
        return true;
    for (int i = 0; i < argc; i++)
        if (strlen(argv[i]) == len && memcmp(argv[i], name, len) == 0)
            return true;
    return false;
}

struct mysql_only {
    vf_t *v;
    struct vf_streams *wal_streams;
    char **filter;
    int n_filter;
};

static int mysql_only_cb(const sync_db_stream_t *s, void *arg)
{
    struct mysql_only *m = arg;
    if (!s->rows || !wanted(m->filter, m->n_filter, s->name, s->name_len))
        return 0;
    for (size_t i = 0; i < m->wal_streams->n; i++)
        if (m->wal_streams->lens[i] == s->name_len &&
            memcmp(m->wal_streams->names[i], s->name, s->name_len) == 0)
            return 0;
    vf_t *v = m->v;
    v->stream = s->name;
    v->stream_len = s->name_len;
    struct vf_run r = {.from = s->min_offset, .to = s->max_offset};
    char detail[256];
    snprintf(detail, sizeof(detail),
             "%" PRIu64 " rows of a stream the WAL does not know at all (a WAL from another "
             "history? see arq-replay restore)",
             s->rows);
    vf_emit(v, VF_EXTRA, &r, detail);
    return 0;
}

int rp_cmd_verify(rp_opts_t *o, int argc, char **argv)
{
    static const struct option extra[] = {
        {"cold", no_argument, NULL, RP_OPT_FIRST_FREE},
        {NULL, 0, NULL, 0},
    };
    vf_t v = {.o = o};
    struct vf_streams ls = {0};
    int oi;
    int rc = rp_parse(o, argc, argv, verify_usage, extra, verify_opt, &v, &oi);
    if (rc)
        return rc < 0 ? RP_OK : rc;
    char **filter = argv + oi;
    int n_filter = argc - oi;
    if ((rc = rp_open_wal(o, &v.wal)) != 0 || (rc = rp_open_db(o, &v.db)) != 0)
        goto out;
    v.problems = json_array();
    if (v.db) {
        if (sync_db_watermark(v.db, &v.wm, NULL, v.err, sizeof(v.err)) != 0)
            goto fail;
        v.have_wm = true;
    }
    int wrc = wal_stream_list(v.wal, vf_list_cb, &ls);
    if (wrc || ls.oom) {
        snprintf(v.err, sizeof(v.err), "listing streams: %s",
                 ls.oom ? "out of memory" : wal_strerror(wrc));
        goto fail;
    }
    for (int i = 0; i < n_filter; i++) {
        bool found = false;
        for (size_t j = 0; j < ls.n && !found; j++)
            found = strcmp(ls.names[j], filter[i]) == 0;
        if (!found)
            rp_say(o, "note: stream '%s' is not in the WAL\n", filter[i]);
    }
    wal_stats_t ws;
    if (wal_stats_get(v.wal, &ws) == 0)
        rp_progress_start(&v.prog, o, "verifying",
                          (ws.next_seq - ws.first_seq) * (n_filter ? 1 : 2));
    for (size_t i = 0; i < ls.n; i++) {
        if (!wanted(filter, n_filter, ls.names[i], ls.lens[i]))
            continue;
        if (vf_stream(&v, ls.names[i], ls.lens[i], &ls.infos[i]) != 0)
            goto fail;
    }
    if (v.db) {
        struct mysql_only m = {&v, &ls, filter, n_filter};
        if (sync_db_streams(v.db, mysql_only_cb, &m, v.err, sizeof(v.err)) != 0)
            goto fail;
    }
    if (n_filter == 0 && vf_log_walk(&v) != 0)
        goto fail;
    rp_progress_end(&v.prog);
    if (o->json) {
        json_t *j = json_object();
        json_object_set_new(j, "ok", json_boolean(v.n_problems == 0));
        json_object_set_new(j, "streams", json_integer((json_int_t)ls.n));
        json_object_set_new(j, "records", json_integer((json_int_t)v.records));
        json_object_set_new(j, "mysql", json_boolean(v.db != NULL));
        json_object_set_new(j, "watermark",
                            v.have_wm ? json_integer((json_int_t)v.wm) : json_null());
        json_object_set_new(j, "compared", json_integer((json_int_t)v.compared));
        json_object_set_new(j, "pending", json_integer((json_int_t)v.pending));
        json_object_set_new(j, "cold_rows", json_integer((json_int_t)v.cold_rows));
        json_object_set_new(j, "problems", v.problems);
        v.problems = NULL;
        if (rp_json_print(j) != 0)
            rc = RP_PROBLEMS;
    } else {
        printf("checked %zu streams, %" PRIu64 " records", ls.n, v.records);
        if (v.db)
            printf("; MySQL: %" PRIu64 " rows compared, watermark seq %" PRIu64 ", %" PRIu64
                   " records not yet synced",
                   v.compared, v.wm, v.pending);
        else
            printf("; MySQL not checked (no --database-url / DATABASE_URL)");
        if (v.cold)
            printf(", %" PRIu64 " cold rows checked", v.cold_rows);
        printf("\n%s", v.n_problems ? "" : "result: OK\n");
        if (v.n_problems)
            printf("result: %" PRIu64 " problem%s\n", v.n_problems, v.n_problems == 1 ? "" : "s");
    }
    if (!rc && v.n_problems)
        rc = RP_PROBLEMS;
    goto out;
fail:
    rp_progress_end(&v.prog);
    rp_err("verify: %s", v.err);
    rc = RP_PROBLEMS;
out:
    json_decref(v.problems);
    for (size_t i = 0; i < ls.n; i++)
        free(ls.names[i]);
    free(ls.names);
    free(ls.lens);
    free(ls.infos);
    free(v.bad);
    rp_batch_free(&v.b);
    sync_db_close(v.db);
    wal_close(v.wal);
    return rc;
}

/* ---- resync -------------------------------------------------------------------- */

static const char resync_usage[] =
    "usage: arq-replay resync [--data-dir DIR] [--database-url URL] [--dry-run]\n"
    "                         [STREAM [--from A] [--to B] [--range A..B]]\n"
    "\n"
    "Write records of the WAL to MySQL again: rows MySQL lacks are inserted, rows\n"
    "that differ from the WAL are replaced, equal rows are left alone - running\n"
    "it twice changes nothing. Without STREAM: every stream, everything the WAL\n"
    "holds. Only records the sync drain has passed (at or below the watermark,\n"
    "locked for the length of each transaction) are written; later ones are left\n"
    "to the drain. DIR may be any copy of the WAL (a backup). Safe next to a\n"
    "running arqd. --dry-run counts what would change.\n"
    "\n"
    "Exit status: 0, 1 if a WAL record is corrupt (skipped) or MySQL failed, 2 usage.\n";

struct rs_ctx {
    rp_range_args_t ra;
    bool dry_run;
};

static int resync_opt(int c, const char *arg, void *ctx)
{
    struct rs_ctx *r = ctx;
    if (c == RP_OPT_FIRST_FREE) {
        r->dry_run = true;
        return 0;
    }
    return rp_range_opt(&r->ra, c, arg);
}

static int resync_stream(rp_opts_t *o, wal_t *wal, sync_db_t *db, const char *name, size_t len,
                         const replay_range_t *range, bool dry_run, rp_progress_t *prog,
                         json_t *out, bool *problems)
{
    wal_stream_info_t info;
    int wrc = wal_stream_get(wal, name, len, &info);
    if (wrc) {
        rp_err("resync: stream '%.*s': %s", (int)len, name, wal_strerror(wrc));
        *problems = true;
        return 0;
    }
    uint64_t from, to;
    if (replay_range_resolve(range, info.first_offset, info.next_offset - 1, &from, &to) != 0) {
        rp_err("resync: --from is after --to");
        return RP_USAGE;
    }
    sync_resync_stats_t st = {0};
    rp_batch_t b = {0};
    char err[512] = "";
    uint64_t next = from, corrupt = 0, skipped_lo = 0, skipped_hi = 0;
    int rc = 0;
    while (next <= to) {
        rp_batch_clear(&b);
        uint64_t want = to - next + 1;
        wal_read_result_t res;
        wrc = wal_stream_read(wal, name, len, next,
                              want < RP_BATCH_RECORDS ? (uint32_t)want : RP_BATCH_RECORDS,
                              RP_BATCH_BYTES, rp_batch_cb, &b, &res);
        if (b.oom) {
            rp_err("resync: out of memory");
            rc = RP_PROBLEMS;
            break;
        }
        if (wrc == WAL_ETRUNCATED) {
            if (!skipped_lo)
                skipped_lo = next;
            skipped_hi = res.next - 1 < to ? res.next - 1 : to;
            next = res.next;
            continue;
        }
        if (wrc && wrc != WAL_ECORRUPT) {
            rp_err("resync: reading '%.*s' at offset %" PRIu64 ": %s", (int)len, name, next,
                   wal_strerror(wrc));
            rc = RP_PROBLEMS;
            break;
        }
        if (b.n) {
            wal_record_t *recs = malloc(b.n * sizeof(*recs));
            if (!recs) {
                rp_err("resync: out of memory");
                rc = RP_PROBLEMS;
                break;
            }
            for (size_t i = 0; i < b.n; i++)
                recs[i] = b.v[i].r;
            int src = sync_db_resync(db, recs, b.n, info.id, info.epoch, info.created_us, dry_run,
                                     &st, err, sizeof(err));
            free(recs);
            if (src) {
                rp_err("resync: stream '%.*s' offsets %" PRIu64 "..%" PRIu64 ": %s", (int)len, name,
                       b.v[0].r.offset, b.v[b.n - 1].r.offset, err);
                rc = RP_PROBLEMS;
                break;
            }
            rp_progress_add(prog, b.n);
        }
        if (wrc == WAL_ECORRUPT) {
            corrupt++;
            rp_err("resync: stream '%.*s' offset %" PRIu64 " (seq %" PRIu64
                   ") is corrupt in the WAL: not written (see arq-replay verify)",
                   (int)len, name, res.bad_offset, res.bad_seq);
            next = res.bad_offset + 1;
            continue;
        }
        if (res.count == 0)
            break;
        next = res.next;
    }
    rp_batch_free(&b);
    if (corrupt)
        *problems = true;
    if (o->json) {
        json_t *j = json_object();
        json_object_set_new(j, "stream", json_stringn(name, len));
        json_object_set_new(j, "from", json_integer((json_int_t)from));
        json_object_set_new(j, "to", json_integer((json_int_t)to));
        json_object_set_new(j, "inserted", json_integer((json_int_t)st.inserted));
        json_object_set_new(j, "replaced", json_integer((json_int_t)st.replaced));
        json_object_set_new(j, "same", json_integer((json_int_t)st.same));
        json_object_set_new(j, "pending", json_integer((json_int_t)st.pending));
        json_object_set_new(j, "corrupt", json_integer((json_int_t)corrupt));
        if (skipped_lo) {
            json_object_set_new(j, "not_in_wal_from", json_integer((json_int_t)skipped_lo));
            json_object_set_new(j, "not_in_wal_to", json_integer((json_int_t)skipped_hi));
        }
        json_object_set_new(j, "ok", json_boolean(rc == 0 && !corrupt));
        json_array_append_new(out, j);
    } else if (!rc) {
        printf("stream '%.*s' offsets %" PRIu64 "..%" PRIu64 ": %s%" PRIu64 " inserted, %" PRIu64
               " replaced, %" PRIu64 " already equal, %" PRIu64
               " after the watermark (left to the drain)",
               (int)len, name, from, to, dry_run ? "(dry run) would be " : "", st.inserted,
               st.replaced, st.same, st.pending);
        if (corrupt)
            printf(", %" PRIu64 " corrupt in the WAL (not written)", corrupt);
        printf("\n");
        if (skipped_lo)
            printf("  offsets %" PRIu64 "..%" PRIu64 " are no longer in the WAL: nothing to "
                   "resync them from (arq-replay verify tells whether MySQL has them)\n",
                   skipped_lo, skipped_hi);
    }
    return rc;
}

int rp_cmd_resync(rp_opts_t *o, int argc, char **argv)
{
    static const struct option extra[] = {
        {"from", required_argument, NULL, RP_OPT_FROM},
        {"to", required_argument, NULL, RP_OPT_TO},
        {"range", required_argument, NULL, RP_OPT_RANGE},
        {"dry-run", no_argument, NULL, RP_OPT_FIRST_FREE},
        {NULL, 0, NULL, 0},
    };
    struct rs_ctx r = {0};
    int oi;
    int rc = rp_parse(o, argc, argv, resync_usage, extra, resync_opt, &r, &oi);
    if (rc)
        return rc < 0 ? RP_OK : rc;
    if (argc - oi > 1) {
        rp_err("resync: at most one STREAM (see --help)");
        return RP_USAGE;
    }
    if (argc == oi && r.ra.any) {
        rp_err("resync: --from/--to/--range need a STREAM");
        return RP_USAGE;
    }
    if (!o->db_url || !*o->db_url) {
        rp_err("resync: needs MySQL: --database-url URL (or DATABASE_URL)");
        return RP_USAGE;
    }
    wal_t *wal = NULL;
    sync_db_t *db = NULL;
    struct vf_streams ls = {0};
    json_t *out = json_array();
    bool problems = false;
    if ((rc = rp_open_wal(o, &wal)) != 0 || (rc = rp_open_db(o, &db)) != 0)
        goto out;
    int wrc = wal_stream_list(wal, vf_list_cb, &ls);
    if (wrc || ls.oom) {
        rp_err("resync: listing streams: %s", ls.oom ? "out of memory" : wal_strerror(wrc));
        rc = RP_PROBLEMS;
        goto out;
    }
    rp_progress_t prog;
    wal_stats_t ws;
    rp_progress_start(&prog, o, r.dry_run ? "checking" : "resyncing",
                      wal_stats_get(wal, &ws) == 0 && argc == oi ? ws.next_seq - ws.first_seq : 0);
    if (argc > oi) {
        rc = resync_stream(o, wal, db, argv[oi], strlen(argv[oi]), &r.ra.r, r.dry_run, &prog, out,
                           &problems);
    } else {
        for (size_t i = 0; i < ls.n && !rc; i++)
            rc = resync_stream(o, wal, db, ls.names[i], ls.lens[i], &r.ra.r, r.dry_run, &prog, out,
                               &problems);
    }
    rp_progress_end(&prog);
    if (o->json) {
        json_t *j = json_object();
        json_object_set_new(j, "ok", json_boolean(!rc && !problems));
        json_object_set_new(j, "dry_run", json_boolean(r.dry_run));
        json_object_set_new(j, "streams", out);
        out = NULL;
        if (rp_json_print(j) != 0 && !rc)
            rc = RP_PROBLEMS;
    }
    if (!rc && problems)
        rc = RP_PROBLEMS;
out:
    json_decref(out);
    for (size_t i = 0; i < ls.n; i++)
        free(ls.names[i]);
    free(ls.names);
    free(ls.lens);
    free(ls.infos);
    sync_db_close(db);
    wal_close(wal);
    return rc;
}

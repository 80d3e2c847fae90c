/*
 * arq-replay - ARQ's incident-recovery tool: inspect, verify, repair and
 * re-deliver a broker's write-ahead log and its MySQL copy.
 *
 *   arq-replay streams    each stream: offsets, epoch, count, bytes, sync lag
 *   arq-replay dump       a stream's records as JSON lines or msgpack
 *   arq-replay verify     checksums, offset continuity, WAL <-> MySQL agreement
 *   arq-replay resync     write a range of the WAL to MySQL again (idempotent)
 *   arq-replay republish  re-deliver a range through a running broker, once
 *   arq-replay restore    rebuild a WAL from MySQL (and a damaged/older WAL)
 *   arq-replay backup     a consistent hot copy of the WAL
 *
 * Every reading command opens the WAL read-only (LMDB MVCC): safe next to a
 * running arqd. Exit codes: 0 all well, 1 problems found or the operation
 * failed, 2 usage error. docs/operations.md ("arq-replay") and
 * docs/runbook.md describe the behaviour; this file holds main(), the
 * options every command shares, output helpers and the record source the
 * commands read ranges with.
 */
#include "arq_replay.h"

#include <getopt.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "wal_record.h"

#define ARQ_REPLAY_VERSION "0.1.0"

static void usage(FILE *f)
{
    fprintf(f, "usage: arq-replay COMMAND [options]\n"
               "\n"
               "Incident recovery for ARQ: inspect, verify, repair and re-deliver.\n"
               "\n"
               "  streams    each stream: first/last offset, epoch, count, bytes, sync lag\n"
               "  dump       records of a stream as JSON lines (or --format msgpack)\n"
               "  verify     every checksum, offset continuity, WAL <-> MySQL agreement\n"
               "  resync     write a range of the WAL to MySQL again (idempotent)\n"
               "  republish  re-deliver a range through a running broker (idempotent)\n"
               "  restore    rebuild a WAL from MySQL (and a damaged or older WAL)\n"
               "  backup     consistent hot copy of the WAL\n"
               "  switchover hand the HA lease from the active arqd to a standby\n"
               "\n"
               "Common options: --data-dir DIR (default $ARQ_DATA_DIR), --database-url URL\n"
               "(default $DATABASE_URL), --json, --[no-]progress. `arq-replay COMMAND --help`\n"
               "describes a command. Reading commands open the WAL read-only and work next\n"
               "to a running arqd.\n"
               "\n"
               "Exit status: 0 all well, 1 problems found or operation failed, 2 usage error.\n");
}

/* ---- output ---------------------------------------------------------------- */

void rp_err(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("arq-replay: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

void rp_say(const rp_opts_t *o, const char *fmt, ...)
{
    if (o->json)
        return;
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stdout, fmt, ap);
    va_end(ap);
}

int rp_json_print(json_t *v)
{
    char *s = v ? json_dumps(v, JSON_COMPACT | JSON_PRESERVE_ORDER | JSON_ENSURE_ASCII) : NULL;
    json_decref(v);
    if (!s) {
        rp_err("cannot encode JSON output");
        return -1;
    }
    int rc = printf("%s\n", s) < 0 ? -1 : 0;
    free(s);
    return rc;
}

json_t *rp_json_u64s(uint64_t v)
{
    char buf[24];
    snprintf(buf, sizeof(buf), "%" PRIu64, v);
    return json_string(buf);
}

json_t *rp_json_text(const uint8_t *p, size_t n)
{
    if (n > (size_t)INT32_MAX)
        return NULL;
    /* json_stringn refuses invalid UTF-8 (and accepts NUL bytes as \u0000) */
    return json_stringn(n ? (const char *)p : "", n);
}

char *rp_base64(const uint8_t *p, size_t n)
{
    static const char tbl[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    char *out = malloc((n + 2) / 3 * 4 + 1);
    if (!out)
        return NULL;
    size_t o = 0, i = 0;
    for (; i + 2 < n; i += 3) {
        uint32_t v = (uint32_t)p[i] << 16 | (uint32_t)p[i + 1] << 8 | p[i + 2];
        out[o++] = tbl[v >> 18];
        out[o++] = tbl[(v >> 12) & 63];
        out[o++] = tbl[(v >> 6) & 63];
        out[o++] = tbl[v & 63];
    }
    if (i < n) {
        uint32_t v = (uint32_t)p[i] << 16 | (i + 1 < n ? (uint32_t)p[i + 1] << 8 : 0);
        out[o++] = tbl[v >> 18];
        out[o++] = tbl[(v >> 12) & 63];
        out[o++] = i + 1 < n ? tbl[(v >> 6) & 63] : '=';
        out[o++] = '=';
    }
    out[o] = 0;
    return out;
}

const char *rp_size(uint64_t bytes, char buf[32])
{
    static const char *const units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    double v = (double)bytes;
    size_t u = 0;
    while (v >= 1024 && u + 1 < sizeof(units) / sizeof(units[0])) {
        v /= 1024;
        u++;
    }
    if (u == 0)
        snprintf(buf, 32, "%" PRIu64 " B", bytes);
    else
        snprintf(buf, 32, "%.1f %s", v, units[u]);
    return buf;
}

/* ---- progress ---------------------------------------------------------------- */

static int64_t mono_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static void progress_draw(rp_progress_t *p)
{
    double secs = (double)(mono_us() - p->start_us) / 1e6;
    double rate = secs > 0 ? (double)p->done / secs : 0;
    if (p->total) {
        uint64_t done = p->done < p->total ? p->done : p->total;
        int fill = (int)(30 * done / p->total);
        fprintf(stderr, "\r%s [%.*s%*s] %3d%% %" PRIu64 "/%" PRIu64 " %.0f/s ", p->label, fill,
                "##############################", 30 - fill, "", (int)(100 * done / p->total),
                p->done, p->total, rate);
    } else {
        fprintf(stderr, "\r%s %" PRIu64 " %.0f/s ", p->label, p->done, rate);
    }
    fflush(stderr);
}

void rp_progress_start(rp_progress_t *p, const rp_opts_t *o, const char *label, uint64_t total)
{
    memset(p, 0, sizeof(*p));
    p->on = o->progress;
    p->label = label;
    p->total = total;
    p->start_us = p->last_us = mono_us();
}

void rp_progress_add(rp_progress_t *p, uint64_t n)
{
    p->done += n;
    if (!p->on)
        return;
    int64_t now = mono_us();
    if (now - p->last_us < 100000)
        return;
    p->last_us = now;
    progress_draw(p);
}

void rp_progress_end(rp_progress_t *p)
{
    if (!p->on || mono_us() - p->start_us < 100000)
        return; /* never drawn */
    progress_draw(p);
    fputc('\n', stderr);
}

/* ---- opening ------------------------------------------------------------------ */

int rp_open_wal(const rp_opts_t *o, wal_t **ret)
{
    if (!o->data_dir || !*o->data_dir) {
        rp_err("no data directory: give --data-dir DIR (or set ARQ_DATA_DIR)");
        return RP_USAGE;
    }
    char err[512] = "";
    uint64_t folded = 0;
    int rc = wal_fold_journal(o->data_dir, &folded, err, sizeof(err));
    if (rc) {
        rp_err("cannot fold the journal of '%s' into LMDB (%s): reading without the batches it "
               "holds",
               o->data_dir, err[0] ? err : wal_strerror(rc));
        err[0] = 0;
    } else if (folded) {
        rp_err("note: the journal in '%s' held %llu acknowledged batches not yet in LMDB (arqd did "
               "not "
               "stop cleanly): folded them in first",
               o->data_dir, (unsigned long long)folded);
    }
    wal_options_t wo = {.dir = o->data_dir, .read_only = 1};
    rc = wal_open(&wo, NULL, ret, err, sizeof(err));
    if (rc) {
        rp_err("cannot open the WAL in '%s': %s", o->data_dir, err[0] ? err : wal_strerror(rc));
        return RP_PROBLEMS;
    }
    return 0;
}

int rp_open_db(const rp_opts_t *o, sync_db_t **ret)
{
    *ret = NULL;
    if (!o->db_url || !*o->db_url)
        return 0;
    sync_url_t u;
    char err[512] = "";
    if (sync_url_parse(o->db_url, &u, err, sizeof(err)) != 0) {
        rp_err("bad database URL: %s", err);
        return RP_USAGE;
    }
    int rc = sync_db_open(&u, ret, err, sizeof(err));
    sync_url_free(&u);
    if (rc) {
        rp_err("%s", err);
        return RP_PROBLEMS;
    }
    return 0;
}

/* ---- owned records -------------------------------------------------------------- */

int rp_batch_add(rp_batch_t *b, const wal_record_t *rec, bool from_mysql)
{
    if (b->n == b->cap) {
        size_t cap = b->cap ? b->cap * 2 : 64;
        rp_rec_t *nv = realloc(b->v, cap * sizeof(*nv));
        if (!nv) {
            b->oom = true;
            return -1;
        }
        b->v = nv;
        b->cap = cap;
    }
    size_t total =
        rec->stream_len + rec->producer_len + rec->msgid_len + rec->headers_len + rec->payload_len;
    uint8_t *blob = malloc(total ? total : 1);
    if (!blob) {
        b->oom = true;
        return -1;
    }
    rp_rec_t *c = &b->v[b->n++];
    c->r = *rec;
    c->blob = blob;
    c->from_mysql = from_mysql;
    size_t off = 0;
#define COPY(f, len)                                                                               \
    do {                                                                                           \
        if (rec->len)                                                                              \
            memcpy(blob + off, rec->f, rec->len);                                                  \
        c->r.f = (void *)(blob + off);                                                             \
        off += rec->len;                                                                           \
    } while (0)
    COPY(stream, stream_len);
    COPY(producer, producer_len);
    COPY(msgid, msgid_len);
    COPY(headers, headers_len);
    COPY(payload, payload_len);
#undef COPY
    b->bytes += rec->payload_len;
    return 0;
}

static wal_record_t row_as_record(const sync_db_row_t *row, const char *stream, size_t stream_len,
                                  uint32_t stream_id)
{
    wal_record_t r = {
        .seq = row->seq,
        .offset = row->offset,
        .timestamp_us = row->ts_us,
        .stream_id = stream_id,
        .direction = row->direction,
        .stream = stream,
        .stream_len = stream_len,
        .producer = row->producer,
        .producer_len = row->producer_len,
        .msgid = row->msgid,
        .msgid_len = row->msgid_len,
        .headers = row->headers,
        .headers_len = row->headers_len,
        .payload = row->payload,
        .payload_len = row->payload_len,
        .checksum = row->checksum,
    };
    return r;
}

int rp_batch_add_row(rp_batch_t *b, const sync_db_row_t *row, const char *stream, size_t stream_len,
                     uint32_t stream_id)
{
    wal_record_t r = row_as_record(row, stream, stream_len, stream_id);
    return rp_batch_add(b, &r, true);
}

void rp_batch_clear(rp_batch_t *b)
{
    for (size_t i = 0; i < b->n; i++)
        free(b->v[i].blob);
    b->n = 0;
    b->bytes = 0;
}

void rp_batch_free(rp_batch_t *b)
{
    rp_batch_clear(b);
    free(b->v);
    memset(b, 0, sizeof(*b));
}

int rp_batch_cb(const wal_record_t *rec, void *arg)
{
    return rp_batch_add(arg, rec, false) != 0;
}

bool rp_row_checksum_ok(const sync_db_row_t *row, uint32_t stream_id)
{
    if (row->producer_len > WAL_PRODUCER_MAX || row->msgid_len > WAL_MSGID_MAX ||
        row->headers_len > WAL_HEADERS_MAX || row->payload_len > UINT32_MAX)
        return false;
    wal_rec_t rec = {
        .flags = row->direction == WAL_DIR_OUT ? WAL_REC_FLAG_OUT : 0,
        .stream_id = stream_id,
        .seq = row->seq,
        .offset = row->offset,
        .timestamp_us = row->ts_us,
        .producer = row->producer,
        .producer_len = (uint16_t)row->producer_len,
        .msgid = row->msgid,
        .msgid_len = (uint16_t)row->msgid_len,
        .headers = row->headers,
        .headers_len = (uint16_t)row->headers_len,
        .payload = row->payload,
        .payload_len = (uint32_t)row->payload_len,
    };
    size_t n = wal_rec_size(&rec);
    uint8_t *buf = malloc(n);
    if (!buf)
        return false;
    bool ok = wal_rec_encode(&rec, buf, n) == 0 && rec.checksum == row->checksum;
    free(buf);
    return ok;
}

/* ---- a range from the WAL, or from MySQL below it -------------------------- */

int rp_stream_extent(wal_t *wal, sync_db_t *db, const char *stream, size_t len,
                     wal_stream_info_t *info, bool *in_wal, uint64_t *first, uint64_t *last,
                     char *err, size_t errlen)
{
    *in_wal = wal && wal_stream_get(wal, stream, len, info) == 0;
    sync_db_stream_t ds = {0};
    if (db && sync_db_stream_get(db, stream, len, &ds, err, errlen) != 0)
        return -1;
    if (!*in_wal && ds.rows == 0) {
        snprintf(err, errlen, "no stream '%.*s' in the WAL%s", (int)len, stream,
                 db ? " or in MySQL" : " (give --database-url to look in MySQL too)");
        return -1;
    }
    if (*in_wal) {
        *first = ds.rows && ds.min_offset < info->first_offset ? ds.min_offset : info->first_offset;
        *last = info->next_offset - 1;
    } else {
        *first = ds.min_offset;
        *last = ds.max_offset;
        memset(info, 0, sizeof(*info));
        info->id = ds.has_meta ? ds.id : 0;
        info->epoch = ds.has_meta ? ds.epoch : 0;
    }
    return 0;
}

void rp_source_init(rp_source_t *s, wal_t *wal, sync_db_t *db, const char *stream, size_t len,
                    uint64_t from, uint64_t to, rp_problem_cb problem, void *arg)
{
    memset(s, 0, sizeof(*s));
    s->wal = wal;
    s->db = db;
    s->stream = stream;
    s->stream_len = len;
    s->next = from ? from : 1;
    s->to = to;
    s->problem = problem;
    s->arg = arg;
    wal_stream_info_t info;
    if (wal && wal_stream_get(wal, stream, len, &info) == 0) {
        s->stream_id = info.id;
        s->epoch = info.epoch;
    } else if (db) {
        sync_db_stream_t ds;
        char e[8];
        if (sync_db_stream_get(db, stream, len, &ds, e, sizeof(e)) == 0 && ds.has_meta) {
            s->stream_id = ds.id;
            s->epoch = ds.epoch;
        }
    }
}

struct row_ctx {
    rp_source_t *s;
    rp_batch_t *b;
    uint64_t expect;
};

static int source_row_cb(const sync_db_row_t *row, void *arg)
{
    struct row_ctx *x = arg;
    rp_source_t *s = x->s;
    if (row->offset > x->expect)
        s->problem(RP_GAP, x->expect, row->offset - 1, 0, s->arg);
    x->expect = row->offset + 1;
    if (s->stream_id && !rp_row_checksum_ok(row, s->stream_id)) {
        s->problem(RP_MYSQL_CORRUPT, row->offset, row->offset, row->seq, s->arg);
        return 0;
    }
    s->from_mysql++;
    return rp_batch_add_row(x->b, row, s->stream, s->stream_len, s->stream_id) != 0;
}

/* Offsets [from, hi] from MySQL, at most one batch. */
static int source_mysql(rp_source_t *s, rp_batch_t *b, uint64_t hi)
{
    if (!s->db) {
        s->problem(RP_GAP, s->next, hi, 0, s->arg);
        s->next = hi + 1;
        return 0;
    }
    struct row_ctx x = {s, b, s->next};
    uint64_t count = 0;
    if (sync_db_rows(s->db, s->stream, s->stream_len, s->next, hi, RP_BATCH_RECORDS, source_row_cb,
                     &x, &count, s->err, sizeof(s->err)) != 0)
        return -1;
    if (b->oom) {
        snprintf(s->err, sizeof(s->err), "out of memory");
        return -1;
    }
    if (count < RP_BATCH_RECORDS) {
        /* every row up to hi was read */
        if (x.expect <= hi)
            s->problem(RP_GAP, x.expect, hi, 0, s->arg);
        s->next = hi + 1;
    } else {
        s->next = x.expect;
    }
    return 0;
}

int rp_source_next(rp_source_t *s, rp_batch_t *b)
{
    rp_batch_clear(b);
    while (s->next <= s->to && b->n == 0) {
        wal_stream_info_t info;
        bool known = s->wal && wal_stream_get(s->wal, s->stream, s->stream_len, &info) == 0;
        if (!known || s->next < info.first_offset) {
            uint64_t hi = !known || s->to < info.first_offset ? s->to : info.first_offset - 1;
            if (source_mysql(s, b, hi) != 0)
                return -1;
            continue;
        }
        if (s->next >= info.next_offset) {
            s->next = s->to + 1; /* past the last offset: nothing more yet */
            break;
        }
        uint64_t want = s->to - s->next + 1;
        wal_read_result_t res;
        int rc = wal_stream_read(s->wal, s->stream, s->stream_len, s->next,
                                 want < RP_BATCH_RECORDS ? (uint32_t)want : RP_BATCH_RECORDS,
                                 RP_BATCH_BYTES, rp_batch_cb, b, &res);
        if (b->oom) {
            snprintf(s->err, sizeof(s->err), "out of memory");
            return -1;
        }
        s->from_wal += res.count;
        if (rc == 0) {
            if (res.count == 0)
                s->next = s->to + 1;
            else
                s->next = res.next;
        } else if (rc == WAL_ETRUNCATED) {
            continue; /* retention moved the first offset: MySQL, next turn */
        } else if (rc == WAL_ECORRUPT) {
            uint64_t bad = res.bad_offset;
            /* A good copy in MySQL (checked against its checksum) stands in. */
            uint64_t before = b->n;
            s->next = bad;
            if (s->db) {
                struct row_ctx x = {s, b, bad};
                uint64_t count = 0;
                if (sync_db_rows(s->db, s->stream, s->stream_len, bad, bad, 1, source_row_cb, &x,
                                 &count, s->err, sizeof(s->err)) != 0)
                    return -1;
            }
            if (b->n == before)
                s->problem(RP_CORRUPT, bad, bad, res.bad_seq, s->arg);
            s->next = bad + 1;
        } else if (rc == WAL_ENOTFOUND) {
            continue;
        } else {
            snprintf(s->err, sizeof(s->err), "WAL read of '%.*s' at offset %" PRIu64 ": %s",
                     (int)s->stream_len, s->stream, s->next, wal_strerror(rc));
            return -1;
        }
    }
    return b->n ? 1 : 0;
}

/* ---- options -------------------------------------------------------------------- */

enum {
    OPT_DATA_DIR = 'd',
    OPT_DB = 'D',
    OPT_JSON = 0x80,
    OPT_NO_PROGRESS,
    OPT_PROGRESS,
    OPT_HELP = 'h'
};

int rp_parse(rp_opts_t *o, int argc, char **argv, const char *cmd_usage, const struct option *extra,
             rp_opt_cb cb, void *ctx, int *ret_optind)
{
    static const struct option common[] = {
        {"data-dir", required_argument, NULL, OPT_DATA_DIR},
        {"database-url", required_argument, NULL, OPT_DB},
        {"json", no_argument, NULL, OPT_JSON},
        {"no-progress", no_argument, NULL, OPT_NO_PROGRESS},
        {"progress", no_argument, NULL, OPT_PROGRESS},
        {"help", no_argument, NULL, OPT_HELP},
    };
    size_t n_common = sizeof(common) / sizeof(common[0]), n_extra = 0;
    while (extra && extra[n_extra].name)
        n_extra++;
    struct option *all = calloc(n_common + n_extra + 1, sizeof(*all));
    if (!all)
        return RP_PROBLEMS;
    memcpy(all, common, sizeof(common));
    if (n_extra)
        memcpy(all + n_common, extra, n_extra * sizeof(*all));
    optind = 0; /* glibc: a full re-initialisation for this argv */
    opterr = 0;
    int rc = 0, c;
    while (!rc && (c = getopt_long(argc, argv, ":hd:D:", all, NULL)) != -1) {
        switch (c) {
        case OPT_DATA_DIR:
            o->data_dir = optarg;
            break;
        case OPT_DB:
            o->db_url = optarg;
            break;
        case OPT_JSON:
            o->json = true;
            break;
        case OPT_NO_PROGRESS:
            o->progress = false;
            break;
        case OPT_PROGRESS: /* also when stderr is no terminal (arqd reads it) */
            o->progress = true;
            break;
        case OPT_HELP:
            fputs(cmd_usage, stdout);
            rc = -1;
            break;
        case ':':
            rp_err("%s: option '%s' needs a value (see --help)", argv[0], argv[optind - 1]);
            rc = RP_USAGE;
            break;
        case '?':
            rp_err("%s: unknown option '%s' (see --help)", argv[0], argv[optind - 1]);
            rc = RP_USAGE;
            break;
        default:
            rc = cb ? cb(c, optarg, ctx) : RP_USAGE;
            if (rc == RP_USAGE && !cb)
                rp_err("%s: unknown option (see --help)", argv[0]);
            break;
        }
    }
    free(all);
    *ret_optind = optind;
    return rc;
}

int rp_range_opt(rp_range_args_t *ra, int c, const char *arg)
{
    replay_bound_t b;
    size_t len = strlen(arg);
    switch (c) {
    case RP_OPT_FROM:
    case RP_OPT_TO:
        if (replay_bound_parse(arg, len, &b) != 0) {
            rp_err("bad offset '%s': an offset >= 1, first, last, first+N or last-N", arg);
            return RP_USAGE;
        }
        if (c == RP_OPT_FROM) {
            ra->r.from = b;
            ra->r.has_from = 1;
        } else {
            ra->r.to = b;
            ra->r.has_to = 1;
        }
        ra->any = true;
        return 0;
    case RP_OPT_RANGE:
        if (replay_range_parse(arg, len, &ra->r) != 0) {
            rp_err("bad range '%s': A..B, A.., ..B or A (A, B: offsets or first/last[+-N])", arg);
            return RP_USAGE;
        }
        ra->any = true;
        return 0;
    default:
        return RP_USAGE;
    }
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        usage(stderr);
        return RP_USAGE;
    }
    const char *cmd = argv[1];
    if (!strcmp(cmd, "-h") || !strcmp(cmd, "--help") || !strcmp(cmd, "help")) {
        usage(stdout);
        return RP_OK;
    }
    if (!strcmp(cmd, "-V") || !strcmp(cmd, "--version")) {
        printf("arq-replay %s\n", ARQ_REPLAY_VERSION);
        return RP_OK;
    }
    rp_opts_t o = {
        .data_dir = getenv("ARQ_DATA_DIR"),
        .db_url = getenv("DATABASE_URL"),
        .progress = isatty(STDERR_FILENO) == 1,
        .argv0 = argv[0],
    };
    static const struct {
        const char *name;
        int (*fn)(rp_opts_t *, int, char **);
    } cmds[] = {
        {"streams", rp_cmd_streams},     {"dump", rp_cmd_dump},
        {"verify", rp_cmd_verify},       {"resync", rp_cmd_resync},
        {"republish", rp_cmd_republish}, {"restore", rp_cmd_restore},
        {"backup", rp_cmd_backup},       {"switchover", rp_cmd_switchover},
    };
    for (size_t i = 0; i < sizeof(cmds) / sizeof(cmds[0]); i++) {
        if (!strcmp(cmd, cmds[i].name)) {
            int rc = cmds[i].fn(&o, argc - 1, argv + 1);
            if (fflush(stdout) != 0) {
                rp_err("writing to stdout failed");
                return RP_PROBLEMS;
            }
            return rc;
        }
    }
    rp_err("unknown command '%s'", cmd);
    usage(stderr);
    return RP_USAGE;
}

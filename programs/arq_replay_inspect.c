/*
 * arq_replay_inspect.c - arq-replay streams, dump and backup: the commands
 * that only read (the WAL read-only, MySQL with SELECTs).
 */
#include <dirent.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <msgpack.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "arq_replay.h"

static int64_t wall_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* ---- streams ---------------------------------------------------------------- */

static const char streams_usage[] =
    "usage: arq-replay streams [--data-dir DIR] [--database-url URL] [--json]\n"
    "\n"
    "Each stream of the WAL: epoch, first and last offset held, record count,\n"
    "payload bytes, and - with a database URL - the sync watermark: the last\n"
    "offset of the stream in MySQL and how many of its records are not there yet\n"
    "(lag). Reads every record once (a progress bar on a terminal). Works next\n"
    "to a running arqd.\n"
    "\n"
    "Exit status: 0, 1 if a record could not be read (run verify), 2 usage.\n";

struct st_stream {
    char *name;
    size_t name_len;
    wal_stream_info_t info;
    uint64_t records, bytes, lag, synced_to;
    int64_t oldest_unsynced_us;
};

struct st_ctx {
    struct st_stream *v;
    size_t n, cap;
    size_t *by_id; /* stream id -> index + 1 */
    size_t by_id_cap;
    bool have_wm;
    uint64_t wm;
    uint64_t corrupt, records;
    int64_t oldest_unsynced_us;
    rp_progress_t prog;
    bool oom;
};

static int st_list_cb(const wal_stream_info_t *info, void *arg)
{
    struct st_ctx *x = arg;
    if (x->n == x->cap) {
        size_t cap = x->cap ? x->cap * 2 : 32;
        struct st_stream *nv = realloc(x->v, cap * sizeof(*nv));
        if (!nv)
            goto oom;
        x->v = nv;
        x->cap = cap;
    }
    if (info->id >= x->by_id_cap) {
        size_t cap = x->by_id_cap ? x->by_id_cap : 64;
        while (cap <= info->id)
            cap *= 2;
        size_t *nb = realloc(x->by_id, cap * sizeof(*nb));
        if (!nb)
            goto oom;
        memset(nb + x->by_id_cap, 0, (cap - x->by_id_cap) * sizeof(*nb));
        x->by_id = nb;
        x->by_id_cap = cap;
    }
    struct st_stream *s = &x->v[x->n];
    memset(s, 0, sizeof(*s));
    s->name = malloc(info->name_len + 1);
    if (!s->name)
        goto oom;
    memcpy(s->name, info->name, info->name_len);
    s->name[info->name_len] = 0;
    s->name_len = info->name_len;
    s->info = *info;
    s->info.name = NULL;
    s->synced_to = info->first_offset - 1; /* dropped by retention: synced by then */
    x->by_id[info->id] = ++x->n;
    return 0;
oom:
    x->oom = true;
    return 1;
}

static int st_rec_cb(const wal_record_t *r, void *arg)
{
    struct st_ctx *x = arg;
    x->records++;
    rp_progress_add(&x->prog, 1);
    size_t i = r->stream_id < x->by_id_cap ? x->by_id[r->stream_id] : 0;
    if (!i)
        return 0; /* a stream created after the listing */
    struct st_stream *s = &x->v[i - 1];
    s->records++;
    s->bytes += r->payload_len;
    if (!x->have_wm)
        return 0;
    if (r->seq <= x->wm) {
        if (r->offset > s->synced_to)
            s->synced_to = r->offset;
    } else {
        s->lag++;
        if (!s->oldest_unsynced_us || r->timestamp_us < s->oldest_unsynced_us)
            s->oldest_unsynced_us = r->timestamp_us;
        if (!x->oldest_unsynced_us || r->timestamp_us < x->oldest_unsynced_us)
            x->oldest_unsynced_us = r->timestamp_us;
    }
    return 0;
}

int rp_cmd_streams(rp_opts_t *o, int argc, char **argv)
{
    int oi;
    int rc = rp_parse(o, argc, argv, streams_usage, NULL, NULL, NULL, &oi);
    if (rc)
        return rc < 0 ? RP_OK : rc;
    if (oi != argc) {
        rp_err("streams: unexpected argument '%s'", argv[oi]);
        return RP_USAGE;
    }
    wal_t *wal = NULL;
    sync_db_t *db = NULL;
    struct st_ctx x = {0};
    int64_t wm_us = 0;
    char err[512] = "";
    if ((rc = rp_open_wal(o, &wal)) != 0 || (rc = rp_open_db(o, &db)) != 0)
        goto out;
    if (db) {
        if (sync_db_watermark(db, &x.wm, &wm_us, err, sizeof(err)) != 0) {
            rp_err("%s", err);
            rc = RP_PROBLEMS;
            goto out;
        }
        x.have_wm = true;
    }
    wal_stats_t ws;
    int wrc = wal_stats_get(wal, &ws);
    if (!wrc)
        wrc = wal_stream_list(wal, st_list_cb, &x);
    if (wrc || x.oom) {
        rp_err("reading the WAL's streams: %s", x.oom ? "out of memory" : wal_strerror(wrc));
        rc = RP_PROBLEMS;
        goto out;
    }
    rp_progress_start(&x.prog, o, "reading", ws.next_seq - ws.first_seq);
    uint64_t from = ws.first_seq;
    for (;;) {
        wal_read_result_t res;
        wrc = wal_log_read(wal, from, 10000, 64u << 20, st_rec_cb, &x, &res);
        if (wrc == WAL_ECORRUPT) {
            x.corrupt++;
            rp_err("corrupt record at seq %" PRIu64 " (run arq-replay verify)", res.bad_seq);
            from = res.bad_seq + 1;
            continue;
        }
        if (wrc) {
            rp_progress_end(&x.prog);
            rp_err("reading the WAL at seq %" PRIu64 ": %s", from, wal_strerror(wrc));
            rc = RP_PROBLEMS;
            goto out;
        }
        if (res.count == 0)
            break;
        from = res.next;
    }
    rp_progress_end(&x.prog);
    int64_t now = wall_us();
    uint64_t lag_total = 0;
    for (size_t i = 0; i < x.n; i++)
        lag_total += x.v[i].lag;
    if (o->json) {
        json_t *arr = json_array();
        for (size_t i = 0; i < x.n; i++) {
            struct st_stream *s = &x.v[i];
            json_t *j = json_object();
            json_object_set_new(j, "stream", json_stringn(s->name, s->name_len));
            json_object_set_new(j, "epoch", rp_json_u64s(s->info.epoch));
            json_object_set_new(j, "first", json_integer((json_int_t)s->info.first_offset));
            json_object_set_new(j, "last", json_integer((json_int_t)s->info.next_offset - 1));
            json_object_set_new(j, "count", json_integer((json_int_t)s->records));
            json_object_set_new(j, "bytes", json_integer((json_int_t)s->bytes));
            json_object_set_new(j, "created_us", json_integer(s->info.created_us));
            if (x.have_wm) {
                json_object_set_new(j, "synced_to", json_integer((json_int_t)s->synced_to));
                json_object_set_new(j, "lag_records", json_integer((json_int_t)s->lag));
                json_object_set_new(
                    j, "lag_seconds",
                    json_real(s->lag ? (double)(now - s->oldest_unsynced_us) / 1e6 : 0.0));
            } else {
                json_object_set_new(j, "synced_to", json_null());
                json_object_set_new(j, "lag_records", json_null());
                json_object_set_new(j, "lag_seconds", json_null());
            }
            json_array_append_new(arr, j);
        }
        json_t *w = json_object();
        json_object_set_new(w, "dir", json_string(o->data_dir));
        json_object_set_new(w, "first_seq", json_integer((json_int_t)ws.first_seq));
        json_object_set_new(w, "next_seq", json_integer((json_int_t)ws.next_seq));
        json_object_set_new(w, "records", json_integer((json_int_t)x.records));
        json_object_set_new(w, "corrupt", json_integer((json_int_t)x.corrupt));
        json_object_set_new(w, "map_bytes", json_integer((json_int_t)ws.map_size));
        json_object_set_new(w, "used_bytes", json_integer((json_int_t)ws.used_bytes));
        json_t *sy = json_object();
        if (x.have_wm) {
            json_object_set_new(sy, "watermark", json_integer((json_int_t)x.wm));
            json_object_set_new(sy, "updated_us", json_integer(wm_us));
            json_object_set_new(sy, "lag_records", json_integer((json_int_t)lag_total));
            json_object_set_new(
                sy, "lag_seconds",
                json_real(lag_total ? (double)(now - x.oldest_unsynced_us) / 1e6 : 0.0));
        } else {
            json_object_set_new(sy, "watermark", json_null());
        }
        json_t *top = json_object();
        json_object_set_new(top, "wal", w);
        json_object_set_new(top, "sync", sy);
        json_object_set_new(top, "streams", arr);
        if (rp_json_print(top) != 0)
            rc = RP_PROBLEMS;
    } else {
        char b1[32], b2[32];
        printf("%-32s %20s %12s %12s %10s %11s", "STREAM", "EPOCH", "FIRST", "LAST", "COUNT",
               "BYTES");
        printf(x.have_wm ? " %12s %8s\n" : "\n", "SYNCED_TO", "LAG");
        for (size_t i = 0; i < x.n; i++) {
            struct st_stream *s = &x.v[i];
            printf("%-32s %20" PRIu64 " %12" PRIu64 " %12" PRIu64 " %10" PRIu64 " %11s", s->name,
                   s->info.epoch, s->info.first_offset, s->info.next_offset - 1, s->records,
                   rp_size(s->bytes, b1));
            if (x.have_wm)
                printf(" %12" PRIu64 " %8" PRIu64, s->synced_to, s->lag);
            printf("\n");
        }
        printf("wal: %zu streams, %" PRIu64 " records (seq %" PRIu64 "..%" PRIu64 "), %s used of "
               "a %s map\n",
               x.n, x.records, ws.first_seq, ws.next_seq - 1, rp_size(ws.used_bytes, b1),
               rp_size(ws.map_size, b2));
        if (x.have_wm)
            printf("sync: watermark seq %" PRIu64 " (moved %.1f s ago); %" PRIu64
                   " records not yet in MySQL%s",
                   x.wm, wm_us ? (double)(now - wm_us) / 1e6 : 0.0, lag_total,
                   lag_total ? "" : "\n");
        if (x.have_wm && lag_total)
            printf(", the oldest %.1f s old\n", (double)(now - x.oldest_unsynced_us) / 1e6);
        if (!x.have_wm)
            printf("sync: unknown (no --database-url / DATABASE_URL)\n");
        if (x.corrupt)
            printf("%" PRIu64 " corrupt records: run arq-replay verify\n", x.corrupt);
    }
    if (!rc && x.corrupt)
        rc = RP_PROBLEMS;
out:
    for (size_t i = 0; i < x.n; i++)
        free(x.v[i].name);
    free(x.v);
    free(x.by_id);
    sync_db_close(db);
    wal_close(wal);
    return rc;
}

/* ---- dump --------------------------------------------------------------------- */

static const char dump_usage[] =
    "usage: arq-replay dump [--data-dir DIR] [--database-url URL] STREAM\n"
    "                       [--from A] [--to B] [--range A..B] [--format json|msgpack]\n"
    "\n"
    "Print the records of STREAM from A to B (default: all of it), in offset\n"
    "order. A and B are offsets, or first/last, or first+N/last-N (--from\n"
    "last-9: the last ten). Offsets the WAL no longer holds are read from MySQL\n"
    "when a database URL is given; a WAL record that fails its checksum is\n"
    "replaced by MySQL's copy if that one matches it, else reported.\n"
    "\n"
    "  --format json     (default) one JSON object per line: stream, offset, seq,\n"
    "                    ts (unix us), direction (in|out), producer, msgid, headers\n"
    "                    (an object), payload (UTF-8 text, or base64 with\n"
    "                    \"encoding\":\"base64\"), checksum (hex), source (wal|mysql)\n"
    "  --format msgpack  the same as one msgpack map per record (bin for bytes,\n"
    "                    headers as the stored msgpack map), concatenated\n"
    "\n"
    "Unreadable offsets are reported on stderr. Exit status: 0, 1 if any offset\n"
    "of the range could not be read, 2 usage.\n";

struct dump_ctx {
    rp_range_args_t ra;
    bool msgpack;
    bool problems;
    const char *stream;
};

static int dump_opt(int c, const char *arg, void *ctx)
{
    struct dump_ctx *d = ctx;
    if (c == RP_OPT_FIRST_FREE) {
        if (!strcmp(arg, "json"))
            d->msgpack = false;
        else if (!strcmp(arg, "msgpack"))
            d->msgpack = true;
        else {
            rp_err("dump: --format is json or msgpack, not '%s'", arg);
            return RP_USAGE;
        }
        return 0;
    }
    return rp_range_opt(&d->ra, c, arg);
}

static void report_problem(enum rp_problem_kind kind, uint64_t from, uint64_t to, uint64_t seq,
                           void *arg)
{
    bool *flag = arg;
    *flag = true;
    switch (kind) {
    case RP_GAP:
        rp_err("offsets %" PRIu64 "..%" PRIu64 " are in neither the WAL nor MySQL", from, to);
        break;
    case RP_CORRUPT:
        rp_err("offset %" PRIu64 " (seq %" PRIu64 ") fails its checksum in the WAL, and there is "
               "no good copy in MySQL (or no database URL): skipped (run arq-replay verify)",
               from, seq);
        break;
    case RP_MYSQL_CORRUPT:
        rp_err("offset %" PRIu64 " (seq %" PRIu64 "): MySQL's row does not match its checksum: "
               "skipped",
               from, seq);
        break;
    }
}

/* Headers (the broker stores a msgpack map str -> str) as a JSON object;
 * NULL if they are something else. */
static json_t *headers_json(const uint8_t *p, size_t n)
{
    msgpack_unpacked u;
    msgpack_unpacked_init(&u);
    size_t off = 0;
    json_t *obj = NULL;
    if (msgpack_unpack_next(&u, (const char *)p, n, &off) == MSGPACK_UNPACK_SUCCESS && off == n &&
        u.data.type == MSGPACK_OBJECT_MAP) {
        obj = json_object();
        msgpack_object_map *m = &u.data.via.map;
        for (uint32_t i = 0; obj && i < m->size; i++) {
            msgpack_object *k = &m->ptr[i].key, *v = &m->ptr[i].val;
            json_t *jv = v->type == MSGPACK_OBJECT_STR
                             ? rp_json_text((const uint8_t *)v->via.str.ptr, v->via.str.size)
                             : NULL;
            char *key =
                k->type == MSGPACK_OBJECT_STR ? strndup(k->via.str.ptr, k->via.str.size) : NULL;
            if (!jv || !key || strlen(key) != k->via.str.size ||
                json_object_set_new(obj, key, jv) != 0) {
                if (jv)
                    json_decref(jv);
                json_decref(obj);
                obj = NULL;
            }
            free(key);
        }
    }
    msgpack_unpacked_destroy(&u);
    return obj;
}

/* field (UTF-8 text) or field_base64 */
static void json_bytes(json_t *o, const char *key, const uint8_t *p, size_t n)
{
    json_t *t = rp_json_text(p, n);
    if (t) {
        json_object_set_new(o, key, t);
        return;
    }
    char k2[64];
    snprintf(k2, sizeof(k2), "%s_base64", key);
    char *b = rp_base64(p, n);
    json_object_set_new(o, k2, b ? json_string(b) : json_null());
    free(b);
}

static int dump_json(const rp_rec_t *c)
{
    const wal_record_t *r = &c->r;
    json_t *o = json_object();
    char sum[17];
    snprintf(sum, sizeof(sum), "%016" PRIx64, r->checksum);
    json_object_set_new(o, "stream", json_stringn(r->stream, r->stream_len));
    json_object_set_new(o, "offset", json_integer((json_int_t)r->offset));
    json_object_set_new(o, "seq", json_integer((json_int_t)r->seq));
    json_object_set_new(o, "ts", json_integer(r->timestamp_us));
    json_object_set_new(o, "direction", json_string(r->direction == WAL_DIR_OUT ? "out" : "in"));
    json_bytes(o, "producer", r->producer, r->producer_len);
    json_bytes(o, "msgid", r->msgid, r->msgid_len);
    if (r->headers_len) {
        json_t *h = headers_json(r->headers, r->headers_len);
        if (h)
            json_object_set_new(o, "headers", h);
        else {
            char *b = rp_base64(r->headers, r->headers_len);
            json_object_set_new(o, "headers_base64", b ? json_string(b) : json_null());
            free(b);
        }
    }
    json_t *p = rp_json_text(r->payload, r->payload_len);
    if (p) {
        json_object_set_new(o, "payload", p);
    } else {
        char *b = rp_base64(r->payload, r->payload_len);
        json_object_set_new(o, "payload", b ? json_string(b) : json_null());
        json_object_set_new(o, "encoding", json_string("base64"));
        free(b);
    }
    json_object_set_new(o, "checksum", json_string(sum));
    json_object_set_new(o, "source", json_string(c->from_mysql ? "mysql" : "wal"));
    return rp_json_print(o);
}

static void mp_str(msgpack_packer *pk, const char *s, size_t n)
{
    msgpack_pack_str(pk, n);
    msgpack_pack_str_body(pk, s, n);
}

static void mp_bin(msgpack_packer *pk, const void *p, size_t n)
{
    msgpack_pack_bin(pk, n);
    msgpack_pack_bin_body(pk, p, n);
}

static bool one_msgpack_object(const uint8_t *p, size_t n)
{
    msgpack_unpacked u;
    msgpack_unpacked_init(&u);
    size_t off = 0;
    bool ok =
        msgpack_unpack_next(&u, (const char *)p, n, &off) == MSGPACK_UNPACK_SUCCESS && off == n;
    msgpack_unpacked_destroy(&u);
    return ok;
}

static int dump_msgpack(const rp_rec_t *c)
{
    const wal_record_t *r = &c->r;
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, 11);
    mp_str(&pk, "stream", 6);
    mp_str(&pk, r->stream, r->stream_len);
    mp_str(&pk, "offset", 6);
    msgpack_pack_uint64(&pk, r->offset);
    mp_str(&pk, "seq", 3);
    msgpack_pack_uint64(&pk, r->seq);
    mp_str(&pk, "ts", 2);
    msgpack_pack_int64(&pk, r->timestamp_us);
    mp_str(&pk, "direction", 9);
    mp_str(&pk, r->direction == WAL_DIR_OUT ? "out" : "in", r->direction == WAL_DIR_OUT ? 3 : 2);
    mp_str(&pk, "producer", 8);
    mp_bin(&pk, r->producer, r->producer_len);
    mp_str(&pk, "msgid", 5);
    mp_bin(&pk, r->msgid, r->msgid_len);
    mp_str(&pk, "headers", 7);
    if (!r->headers_len)
        msgpack_pack_nil(&pk);
    else if (one_msgpack_object(r->headers, r->headers_len))
        msgpack_sbuffer_write(&sb, (const char *)r->headers, r->headers_len);
    else
        mp_bin(&pk, r->headers, r->headers_len);
    mp_str(&pk, "payload", 7);
    mp_bin(&pk, r->payload, r->payload_len);
    mp_str(&pk, "checksum", 8);
    msgpack_pack_uint64(&pk, r->checksum);
    mp_str(&pk, "source", 6);
    mp_str(&pk, c->from_mysql ? "mysql" : "wal", c->from_mysql ? 5 : 3);
    int rc = fwrite(sb.data, 1, sb.size, stdout) == sb.size ? 0 : -1;
    msgpack_sbuffer_destroy(&sb);
    return rc;
}

int rp_cmd_dump(rp_opts_t *o, int argc, char **argv)
{
    static const struct option extra[] = {
        {"from", required_argument, NULL, RP_OPT_FROM},
        {"to", required_argument, NULL, RP_OPT_TO},
        {"range", required_argument, NULL, RP_OPT_RANGE},
        {"format", required_argument, NULL, RP_OPT_FIRST_FREE},
        {NULL, 0, NULL, 0},
    };
    struct dump_ctx d = {0};
    int oi;
    int rc = rp_parse(o, argc, argv, dump_usage, extra, dump_opt, &d, &oi);
    if (rc)
        return rc < 0 ? RP_OK : rc;
    if (argc - oi != 1) {
        rp_err("dump: give exactly one STREAM (see --help)");
        return RP_USAGE;
    }
    d.stream = argv[oi];
    size_t slen = strlen(d.stream);
    wal_t *wal = NULL;
    sync_db_t *db = NULL;
    rp_batch_t b = {0};
    if ((rc = rp_open_wal(o, &wal)) != 0 || (rc = rp_open_db(o, &db)) != 0)
        goto out;
    wal_stream_info_t info;
    bool in_wal;
    uint64_t first, last, from, to;
    char err[512];
    if (rp_stream_extent(wal, db, d.stream, slen, &info, &in_wal, &first, &last, err,
                         sizeof(err)) != 0) {
        rp_err("%s", err);
        rc = RP_PROBLEMS;
        goto out;
    }
    if (replay_range_resolve(&d.ra.r, first, last, &from, &to) != 0) {
        rp_err("dump: --from is after --to");
        rc = RP_USAGE;
        goto out;
    }
    rp_source_t src;
    rp_source_init(&src, wal, db, d.stream, slen, from, to, report_problem, &d.problems);
    rp_progress_t prog;
    o->progress = o->progress && !isatty(STDOUT_FILENO); /* no bar over the records */
    rp_progress_start(&prog, o, "dumping", to >= from ? to - from + 1 : 0);
    int n;
    while ((n = rp_source_next(&src, &b)) > 0) {
        for (size_t i = 0; i < b.n; i++) {
            if ((d.msgpack ? dump_msgpack(&b.v[i]) : dump_json(&b.v[i])) != 0) {
                rp_progress_end(&prog);
                rp_err("writing stdout failed");
                rc = RP_PROBLEMS;
                goto out;
            }
        }
        rp_progress_add(&prog, b.n);
    }
    rp_progress_end(&prog);
    if (n < 0) {
        rp_err("%s", src.err);
        rc = RP_PROBLEMS;
    } else if (d.problems) {
        rc = RP_PROBLEMS;
    }
out:
    rp_batch_free(&b);
    sync_db_close(db);
    wal_close(wal);
    return rc;
}

/* ---- backup ------------------------------------------------------------------- */

static const char backup_usage[] =
    "usage: arq-replay backup [--data-dir DIR] OUT\n"
    "\n"
    "A consistent, compacted hot copy of the WAL in DIR, taken in one read\n"
    "transaction while arqd keeps running, written to OUT/data.mdb (mode 0600)\n"
    "and fsynced. OUT must not exist (it is created, mode 0700) or be an empty\n"
    "directory. The copy is an ordinary data directory: point arqd at it, or\n"
    "use it with restore --from-wal / resync --data-dir.\n"
    "\n"
    "Exit status: 0, 1 if the copy failed (nothing is left in OUT), 2 usage.\n";

static int dir_is_empty(const char *path)
{
    DIR *d = opendir(path);
    if (!d)
        return -1;
    struct dirent *e;
    int empty = 1;
    while ((e = readdir(d))) {
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) {
            empty = 0;
            break;
        }
    }
    closedir(d);
    return empty;
}

static int count_cb(const wal_stream_info_t *info, void *arg)
{
    (void)info;
    (*(size_t *)arg)++;
    return 0;
}

int rp_cmd_backup(rp_opts_t *o, int argc, char **argv)
{
    int oi;
    int rc = rp_parse(o, argc, argv, backup_usage, NULL, NULL, NULL, &oi);
    if (rc)
        return rc < 0 ? RP_OK : rc;
    if (argc - oi != 1) {
        rp_err("backup: give exactly one output directory OUT (see --help)");
        return RP_USAGE;
    }
    const char *out = argv[oi];
    bool created = false;
    struct stat st;
    if (stat(out, &st) == 0) {
        if (!S_ISDIR(st.st_mode) || dir_is_empty(out) != 1) {
            rp_err("backup: '%s' exists and is not an empty directory: refusing to write there",
                   out);
            return RP_USAGE;
        }
    } else if (errno != ENOENT || mkdir(out, 0700) != 0) {
        rp_err("backup: cannot create '%s': %s", out, strerror(errno));
        return RP_PROBLEMS;
    } else {
        created = true;
    }
    wal_t *wal = NULL, *copy = NULL;
    if ((rc = rp_open_wal(o, &wal)) != 0)
        goto out;
    char err[512] = "";
    int64_t t0 = wall_us();
    int wrc = wal_backup(wal, out, err, sizeof(err));
    if (wrc) {
        rp_err("backup of '%s' to '%s' failed: %s", o->data_dir, out,
               err[0] ? err : wal_strerror(wrc));
        rc = RP_PROBLEMS;
        goto out;
    }
    /* The copy must open and list as a WAL of its own. */
    wal_options_t wo = {.dir = out, .read_only = 1};
    wal_stats_t ws;
    size_t n_streams = 0;
    wrc = wal_open(&wo, NULL, &copy, err, sizeof(err));
    if (!wrc)
        wrc = wal_stats_get(copy, &ws);
    if (wrc) {
        rp_err("the copy in '%s' does not open: %s", out, err[0] ? err : wal_strerror(wrc));
        rc = RP_PROBLEMS;
        goto out;
    }
    char path[4096];
    snprintf(path, sizeof(path), "%s/data.mdb", out);
    uint64_t size = stat(path, &st) == 0 ? (uint64_t)st.st_size : 0;
    wrc = wal_stream_list(copy, count_cb, &n_streams);
    if (wrc) {
        rp_err("the copy in '%s' does not list its streams: %s", out, wal_strerror(wrc));
        rc = RP_PROBLEMS;
        goto out;
    }
    double secs = (double)(wall_us() - t0) / 1e6;
    char b1[32];
    if (o->json) {
        json_t *j = json_object();
        json_object_set_new(j, "source", json_string(o->data_dir));
        json_object_set_new(j, "out", json_string(out));
        json_object_set_new(j, "bytes", json_integer((json_int_t)size));
        json_object_set_new(j, "streams", json_integer((json_int_t)n_streams));
        json_object_set_new(j, "first_seq", json_integer((json_int_t)ws.first_seq));
        json_object_set_new(j, "next_seq", json_integer((json_int_t)ws.next_seq));
        json_object_set_new(j, "seconds", json_real(secs));
        if (rp_json_print(j) != 0)
            rc = RP_PROBLEMS;
    } else {
        printf("backup of '%s' written to '%s/data.mdb': %s, %zu streams, records up to seq "
               "%" PRIu64 ", %.2f s\n",
               o->data_dir, out, rp_size(size, b1), n_streams, ws.next_seq - 1, secs);
    }
out:
    wal_close(copy);
    wal_close(wal);
    if (rc && created)
        (void)rmdir(out);
    return rc;
}

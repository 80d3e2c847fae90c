/*
 * arq_replay_republish.c - arq-replay republish: re-deliver a range of a
 * stream (from the WAL, or from MySQL for offsets the WAL no longer holds)
 * through a running broker, with libarq.
 *
 * Idempotence: every message carries a message id derived from where it
 * comes from and where it goes (source stream, its epoch, the offset, the
 * target stream). The broker deduplicates (producer, message id), and the
 * producer is the token's subject, so a second run with the same subject
 * publishes nothing new: each publish is answered "duplicate" with the
 * offset of the first run. An anonymous connection is its own producer (its
 * session id), which would defeat this: republish refuses to run without a
 * token unless --anonymous is given.
 */
#include <event2/event.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <xxhash.h>

#include "arq.h"
#include "arq_replay.h"
#include "auth.h"

static const char republish_usage[] =
    "usage: arq-replay republish --url ws://HOST:PORT/ws [--data-dir DIR]\n"
    "                            [--database-url URL] STREAM [--from A] [--to B]\n"
    "                            [--range A..B] [--to-stream X] [--dry-run]\n"
    "                            [--token JWT] [--anonymous] [--window N]\n"
    "\n"
    "Publish the records of STREAM from A to B (default: all) again through a\n"
    "running broker, to STREAM itself or to X, in offset order. Offsets the WAL no\n"
    "longer holds are read from MySQL (with a database URL). Payloads and headers\n"
    "are sent as stored; the producer and the original timestamp are not (the\n"
    "producer is the token's subject, and the broker stamps a new time).\n"
    "\n"
    "Each message carries a message id made from (STREAM, its epoch, offset, X):\n"
    "the broker deduplicates it per producer (the token's subject), so running\n"
    "the same republish twice publishes each message once - for as long as the\n"
    "broker's WAL keeps the first copies (its retention).\n"
    "\n"
    "  --url URL       the broker (default $ARQ_URL): ws://HOST:PORT/ws, or\n"
    "                  wss://HOST/ws through a TLS proxy (certificate verified)\n"
    "  --ca FILE       wss: verify against the CAs in FILE instead of the system's\n"
    "  --token JWT     access token allowed to publish to the target ($ARQ_TOKEN);\n"
    "                  without one, a token for subject \"arq-replay\" is made from\n"
    "                  $SECRET_KEY if set (the broker's own key)\n"
    "  --anonymous     allow republishing without a token (an anonymous broker):\n"
    "                  deduplication then spans one run only\n"
    "  --to-stream X   publish to X instead of STREAM\n"
    "  --window N      publishes in flight (default 256)\n"
    "  --dry-run       read and count what would be published; do not connect\n"
    "\n"
    "Exit status: 0 every message of the range is in the target (published now or\n"
    "before), 1 some could not be read or published (running it again is safe),\n"
    "2 usage.\n";

enum {
    OPT_URL = RP_OPT_FIRST_FREE,
    OPT_TO_STREAM,
    OPT_TOKEN,
    OPT_ANON,
    OPT_WINDOW,
    OPT_DRY,
    OPT_CA,
};

typedef struct rpb {
    rp_opts_t *o;
    rp_range_args_t ra;
    const char *url, *token, *target, *ca;
    bool anonymous, dry_run;
    uint64_t window;
    char *minted;

    struct event_base *base;
    arq_client_t *c;
    rp_source_t src;
    rp_batch_t b;
    size_t idx;
    bool src_done, finished, problems;
    uint64_t inflight, published, duplicates, failed, skipped, bytes;
    uint64_t max_payload;
    int conn_status;
    char first_error[256];
    rp_progress_t prog;
} rpb_t;

static int republish_opt(int c, const char *arg, void *ctx)
{
    rpb_t *r = ctx;
    switch (c) {
    case OPT_URL:
        r->url = arg;
        return 0;
    case OPT_TO_STREAM:
        r->target = arg;
        return 0;
    case OPT_TOKEN:
        r->token = arg;
        return 0;
    case OPT_ANON:
        r->anonymous = true;
        return 0;
    case OPT_WINDOW:
        if (replay_parse_u64(arg, strlen(arg), &r->window) != 0 || r->window == 0 ||
            r->window > 100000) {
            rp_err("republish: --window takes 1..100000, not '%s'", arg);
            return RP_USAGE;
        }
        return 0;
    case OPT_DRY:
        r->dry_run = true;
        return 0;
    case OPT_CA:
        r->ca = arg;
        return 0;
    default:
        return rp_range_opt(&r->ra, c, arg);
    }
}

static void problem_cb(enum rp_problem_kind kind, uint64_t from, uint64_t to, uint64_t seq,
                       void *arg)
{
    rpb_t *r = arg;
    r->problems = true;
    r->skipped += to - from + 1;
    switch (kind) {
    case RP_GAP:
        rp_err("offsets %" PRIu64 "..%" PRIu64 " are in neither the WAL nor MySQL: not "
               "republished",
               from, to);
        break;
    case RP_CORRUPT:
        rp_err("offset %" PRIu64 " (seq %" PRIu64 ") is corrupt in the WAL, and there is no "
               "good copy in MySQL (or no database URL): not republished",
               from, seq);
        break;
    case RP_MYSQL_CORRUPT:
        rp_err("offset %" PRIu64 " (seq %" PRIu64 "): MySQL's row fails its checksum: not "
               "republished",
               from, seq);
        break;
    }
}

/* "arq-replay:" + 32 hex digits of XXH3-128 over where the message comes
 * from and where it goes. */
static void make_msgid(const rpb_t *r, uint64_t offset, char out[64])
{
    size_t sl = r->src.stream_len, tl = strlen(r->target);
    uint8_t buf[3 + 255 + 1 + 16 + 1 + 255];
    size_t n = 0;
    memcpy(buf, "v1", 3);
    n = 3;
    memcpy(buf + n, r->src.stream, sl);
    n += sl;
    buf[n++] = 0;
    for (int i = 0; i < 8; i++)
        buf[n++] = (uint8_t)(r->src.epoch >> (8 * i));
    for (int i = 0; i < 8; i++)
        buf[n++] = (uint8_t)(offset >> (8 * i));
    buf[n++] = 0;
    memcpy(buf + n, r->target, tl);
    n += tl;
    XXH128_hash_t h = XXH3_128bits(buf, n);
    snprintf(out, 64, "arq-replay:%016" PRIx64 "%016" PRIx64, (uint64_t)h.high64,
             (uint64_t)h.low64);
}

static void closed_cb(arq_client_t *c, void *arg)
{
    (void)c;
    event_base_loopbreak(((rpb_t *)arg)->base);
}

/* Close cleanly (a close frame) when connected, then leave the loop. */
static void finish(rpb_t *r)
{
    if (r->finished)
        return;
    r->finished = true;
    if (arq_client_close(r->c, closed_cb, r) != 0)
        event_base_loopbreak(r->base);
}

static void pump(rpb_t *r);

struct pub {
    rpb_t *r;
    uint64_t offset;
};

static void pub_cb(arq_client_t *c, int status, uint64_t offset, int duplicate, void *arg)
{
    (void)c;
    (void)offset;
    struct pub *p = arg;
    rpb_t *r = p->r;
    r->inflight--;
    rp_progress_add(&r->prog, 1);
    if (status == 0) {
        if (duplicate)
            r->duplicates++;
        else
            r->published++;
    } else {
        r->failed++;
        r->problems = true;
        if (!r->first_error[0])
            snprintf(r->first_error, sizeof(r->first_error), "offset %" PRIu64 ": %s%s%s",
                     p->offset, arq_strerror(status), arq_client_last_error(r->c)[0] ? ": " : "",
                     arq_client_last_error(r->c));
        if (status == ARQ_ECONNLOST || status == ARQ_ECLOSED || status == ARQ_ENOTCONN)
            r->src_done = true; /* the connection is gone: stop reading */
    }
    free(p);
    if (!r->finished)
        pump(r);
}

static void pump(rpb_t *r)
{
    while (!r->finished && r->inflight < r->window && !r->src_done) {
        if (r->idx == r->b.n) {
            r->idx = 0;
            int n = rp_source_next(&r->src, &r->b);
            if (n < 0) {
                rp_err("%s", r->src.err);
                r->problems = true;
                r->src_done = true;
                break;
            }
            if (n == 0) {
                r->src_done = true;
                break;
            }
        }
        const wal_record_t *rec = &r->b.v[r->idx++].r;
        if (r->max_payload && rec->payload_len > r->max_payload) {
            r->failed++;
            r->problems = true;
            rp_err("offset %" PRIu64 ": payload of %zu bytes is over the broker's max_payload "
                   "(%" PRIu64 "): not republished",
                   rec->offset, rec->payload_len, r->max_payload);
            rp_progress_add(&r->prog, 1);
            continue;
        }
        struct pub *p = malloc(sizeof(*p));
        if (!p) {
            rp_err("out of memory");
            r->problems = true;
            r->src_done = true;
            break;
        }
        p->r = r;
        p->offset = rec->offset;
        char msgid[64];
        make_msgid(r, rec->offset, msgid);
        int rc = arq_publish_headers(r->c, r->target, rec->payload, rec->payload_len, msgid,
                                     rec->headers, rec->headers_len, pub_cb, p);
        if (rc) {
            free(p);
            r->failed++;
            r->problems = true;
            if (!r->first_error[0])
                snprintf(r->first_error, sizeof(r->first_error), "offset %" PRIu64 ": %s",
                         rec->offset, arq_strerror(rc));
            if (rc == ARQ_ENOTCONN) {
                r->src_done = true;
                break;
            }
            continue;
        }
        r->inflight++;
        r->bytes += rec->payload_len;
    }
    if (r->src_done && r->inflight == 0)
        finish(r);
}

static void connect_cb(arq_client_t *c, int status, void *arg)
{
    rpb_t *r = arg;
    if (status != 0) {
        r->conn_status = status;
        snprintf(r->first_error, sizeof(r->first_error), "cannot connect to %s: %s%s%s", r->url,
                 arq_strerror(status), arq_client_last_error(c)[0] ? ": " : "",
                 arq_client_last_error(c));
        r->problems = true;
        finish(r);
        return;
    }
    r->max_payload = arq_client_max_payload(c);
    pump(r);
}

static void error_cb(arq_client_t *c, int status, const char *reason, void *arg)
{
    (void)c;
    rpb_t *r = arg;
    if (!r->first_error[0])
        snprintf(r->first_error, sizeof(r->first_error), "%s%s%s", arq_strerror(status),
                 reason && *reason ? ": " : "", reason ? reason : "");
}

/* The token: --token, $ARQ_TOKEN, or one made from $SECRET_KEY. */
static int pick_token(rpb_t *r)
{
    if (!r->token || !*r->token)
        r->token = getenv("ARQ_TOKEN");
    if (r->token && *r->token)
        return 0;
    r->token = NULL;
    const char *key = getenv("SECRET_KEY");
    if (key && *key) {
        const char *pub[] = {r->target};
        int rc = auth_issue((const uint8_t *)key, strlen(key), "arq-replay",
                            (int64_t)time(NULL) + 3600, pub, 1, NULL, 0, &r->minted);
        if (rc) {
            rp_err("republish: cannot make a token from SECRET_KEY: %s", auth_strerror(rc));
            return RP_PROBLEMS;
        }
        r->token = r->minted;
        return 0;
    }
    if (!r->anonymous) {
        rp_err("republish: no token (--token, ARQ_TOKEN or SECRET_KEY). Without one the broker "
               "deduplicates per connection only, so a second run would publish everything "
               "again; give --anonymous to accept that");
        return RP_USAGE;
    }
    return 0;
}

int rp_cmd_republish(rp_opts_t *o, int argc, char **argv)
{
    static const struct option extra[] = {
        {"from", required_argument, NULL, RP_OPT_FROM},
        {"to", required_argument, NULL, RP_OPT_TO},
        {"range", required_argument, NULL, RP_OPT_RANGE},
        {"url", required_argument, NULL, OPT_URL},
        {"to-stream", required_argument, NULL, OPT_TO_STREAM},
        {"token", required_argument, NULL, OPT_TOKEN},
        {"anonymous", no_argument, NULL, OPT_ANON},
        {"window", required_argument, NULL, OPT_WINDOW},
        {"dry-run", no_argument, NULL, OPT_DRY},
        {"ca", required_argument, NULL, OPT_CA},
        {NULL, 0, NULL, 0},
    };
    rpb_t r = {.o = o, .window = 256, .url = getenv("ARQ_URL")};
    int oi;
    int rc = rp_parse(o, argc, argv, republish_usage, extra, republish_opt, &r, &oi);
    if (rc)
        return rc < 0 ? RP_OK : rc;
    if (argc - oi != 1) {
        rp_err("republish: give exactly one STREAM (see --help)");
        return RP_USAGE;
    }
    const char *stream = argv[oi];
    if (!r.target)
        r.target = stream;
    if (!r.dry_run && (!r.url || !*r.url)) {
        rp_err("republish: --url ws://HOST:PORT/ws is required (or ARQ_URL)");
        return RP_USAGE;
    }
    if (strlen(r.target) > WAL_STREAM_NAME_MAX) {
        rp_err("republish: --to-stream is too long");
        return RP_USAGE;
    }
    if (!r.dry_run && (rc = pick_token(&r)) != 0)
        return rc;
    wal_t *wal = NULL;
    sync_db_t *db = NULL;
    if ((rc = rp_open_wal(o, &wal)) != 0 || (rc = rp_open_db(o, &db)) != 0)
        goto out;
    wal_stream_info_t info;
    bool in_wal;
    uint64_t first, last, from, to;
    char err[512];
    if (rp_stream_extent(wal, db, stream, strlen(stream), &info, &in_wal, &first, &last, err,
                         sizeof(err)) != 0) {
        rp_err("republish: %s", err);
        rc = RP_PROBLEMS;
        goto out;
    }
    if (replay_range_resolve(&r.ra.r, first, last, &from, &to) != 0) {
        rp_err("republish: --from is after --to");
        rc = RP_USAGE;
        goto out;
    }
    rp_source_init(&r.src, wal, db, stream, strlen(stream), from, to, problem_cb, &r);
    rp_progress_start(&r.prog, o, r.dry_run ? "reading" : "republishing",
                      to >= from ? to - from + 1 : 0);
    if (r.dry_run) {
        int n;
        uint64_t count = 0;
        while ((n = rp_source_next(&r.src, &r.b)) > 0) {
            count += r.b.n;
            r.bytes += r.b.bytes;
            rp_progress_add(&r.prog, r.b.n);
        }
        rp_progress_end(&r.prog);
        if (n < 0) {
            rp_err("%s", r.src.err);
            rc = RP_PROBLEMS;
            goto out;
        }
        r.published = count;
    } else {
        r.base = event_base_new();
        arq_client_options_t co = {
            .url = r.url, .token = r.token, .client_name = "arq-replay", .ca_file = r.ca};
        if (!r.base || (rc = arq_client_new(r.base, &co, &r.c)) != 0) {
            rp_err("republish: cannot create the client for '%s': %s", r.url,
                   r.base ? arq_strerror(rc) : "event_base_new failed");
            rc = r.base ? RP_USAGE : RP_PROBLEMS;
            goto out;
        }
        arq_client_on_error(r.c, error_cb, &r);
        if ((rc = arq_client_connect(r.c, connect_cb, &r)) != 0) {
            rp_err("republish: connect: %s", arq_strerror(rc));
            rc = RP_PROBLEMS;
            goto out;
        }
        event_base_dispatch(r.base);
        rp_progress_end(&r.prog);
        rc = 0;
    }
    if (r.first_error[0])
        rp_err("republish: %s", r.first_error);
    if (o->json) {
        json_t *j = json_object();
        json_object_set_new(j, "ok", json_boolean(!r.problems));
        json_object_set_new(j, "stream", json_string(stream));
        json_object_set_new(j, "to_stream", json_string(r.target));
        json_object_set_new(j, "from", json_integer((json_int_t)from));
        json_object_set_new(j, "to", json_integer((json_int_t)to));
        json_object_set_new(j, "dry_run", json_boolean(r.dry_run));
        json_object_set_new(j, r.dry_run ? "would_publish" : "published",
                            json_integer((json_int_t)r.published));
        json_object_set_new(j, "duplicates", json_integer((json_int_t)r.duplicates));
        json_object_set_new(j, "failed", json_integer((json_int_t)r.failed));
        json_object_set_new(j, "skipped", json_integer((json_int_t)r.skipped));
        json_object_set_new(j, "bytes", json_integer((json_int_t)r.bytes));
        if (rp_json_print(j) != 0)
            rc = RP_PROBLEMS;
    } else if (r.dry_run) {
        char b1[32];
        printf("would republish '%s' offsets %" PRIu64 "..%" PRIu64 " to '%s': %" PRIu64
               " messages, %s (%" PRIu64 " from the WAL, %" PRIu64 " from MySQL)\n",
               stream, from, to, r.target, r.published, rp_size(r.bytes, b1), r.src.from_wal,
               r.src.from_mysql);
    } else {
        printf("republished '%s' offsets %" PRIu64 "..%" PRIu64 " to '%s': %" PRIu64
               " published, %" PRIu64 " already there (duplicates), %" PRIu64 " failed, %" PRIu64
               " not readable\n",
               stream, from, to, r.target, r.published, r.duplicates, r.failed, r.skipped);
        if (r.failed)
            printf("running the same command again is safe: it publishes only what is "
                   "missing\n");
    }
    if (!rc && r.problems)
        rc = RP_PROBLEMS;
out:
    if (r.c)
        arq_client_free(r.c);
    if (r.base)
        event_base_free(r.base);
    free(r.minted);
    rp_batch_free(&r.b);
    sync_db_close(db);
    wal_close(wal);
    return rc;
}

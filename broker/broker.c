/*
 * broker.c - streams, subscriptions, publish path, delivery and flow
 * control (see broker.h for the model).
 */
#include "broker.h"

#include <event2/event.h>
#include <msgpack.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "broker_int.h"
#include "proto.h"
#include "replay.h"

#define CATCHUP_BATCH  256u
#define CATCHUP_BYTES  (1u << 20)
#define DELIVER_BUDGET 4096u /* messages per client per loop turn */

typedef struct brk_stream brk_stream_t;
typedef struct brk_sub brk_sub_t;

struct brk_sub {
    brk_client_t *client;
    brk_stream_t *stream;
    uint64_t next;      /* next offset to deliver */
    uint64_t acked;     /* cumulative ack */
    uint64_t persisted; /* acked offset last handed to the WAL as a cursor */
    bool recorded;      /* a durable session's cursor for it was handed to the WAL */
    rpl_sub_t *rs;      /* catch-up state (cold-tier reads) */
    bool broken;        /* a read failed (corrupt record): stopped, told once */
    brk_sub_t *next_in_stream, *prev_in_stream;
    brk_sub_t *next_in_client;
};

struct brk_stream {
    char *name;
    size_t name_len;
    uint64_t hash;
    uint64_t epoch, first, next; /* committed state as the broker knows it */
    brk_sub_t *subs;
    /* tail cache: cache[off % cap] holds the frame of off, for off in
     * [cache_first, next); allocated with its first frame, freed when
     * empty. cache_bytes counts against the broker's tail_cache_bytes. */
    brk_frame_t **cache;
    uint64_t cache_first;
    uint64_t cache_bytes;
    brk_stream_t *lru_prev, *lru_next; /* b->lru_*: streams with frames, most recent first */
    int64_t used_s;                    /* CLOCK_MONOTONIC s: last publish or subscription */
    brk_stream_t *hnext;
    /* A subscriber waits for records acknowledged but not yet readable from
     * the WAL (behind the tail cache): woken by brk_visible. */
    bool stalled;
    brk_stream_t *next_stalled;
    /* records of this stream held back until MySQL has them (ack =
     * replicated deployments, struct held): the stream is never freed
     * while any wait */
    uint32_t held;
};

struct brk_client {
    brk_t *b;
    const brk_client_ops_t *ops;
    void *conn;
    char *session;
    char *producer;
    char **pub, **subs;
    size_t n_pub, n_subs;
    bool pub_all, subs_all;
    bool closed;
    bool ephemeral; /* its session is not stored (brk_client_ephemeral): nor are its acks */
    int refs;
    size_t pending_pubs;
    bool dirty;               /* has acks not yet persisted (and is on the dirty list) */
    brk_client_t *next_dirty; /* the dirty list holds a reference */
    brk_sub_t *sub_list;
    size_t n_sub;
    struct event *work; /* deferred delivery when the budget ran out */
    /* durable session (brk_session_create/resume) */
    bool durable;
    bool in_table;       /* in b->sess (the session's live connection) */
    brk_client_t *snext; /* session table chain */
    char *owner;
    uint8_t secret[WAL_SECRET_MAX];
    uint8_t secret_len;
    int64_t created_us;
};

struct brk {
    struct event_base *base;
    wal_t *wal;
    rpl_t *rpl; /* catch-up reads */
    brk_options_t o;
    brk_stream_t **buckets;
    size_t n_buckets, n_streams;
    brk_stream_t *stalled;             /* streams waiting for the WAL's next LMDB commit */
    uint64_t reloads;                  /* wal_reloads() when the streams were last checked */
    brk_stream_t *lru_head, *lru_tail; /* tail caches, most recently filled first */
    uint64_t cache_bytes;              /* all tail caches */
    struct event *evict_ev;            /* idle streams are freed (evict_idle) */
    brk_owners_t *owners;              /* sessions per owner (brk_owners.c) */
    proto_buf_t reply;                 /* pub_done's puback/nack, reused (send_buf copies it) */
    brk_client_t *dirty;               /* clients with acks to persist */
    struct event *flush_ev;
    brk_client_t **sess; /* live durable sessions by id (chained) */
    size_t n_sess_buckets;
    /* Sessions whose connection closed while the WAL was still writing
     * their last changes, oldest first (see struct handoff). */
    struct handoff *handoff_head, *handoff_tail;
    size_t n_handoffs;
    struct event *expire_ev;
    /* ack = replicated (docs/ha.md): publishes appended and durable here,
     * waiting for MySQL to commit them, in completion order (their target
     * sequences and deadlines grow along the list). */
    struct pub_ctx *repl_head, *repl_tail;
    /* ... and, in a replicated deployment, the deliveries of records MySQL
     * does not hold yet, in commit order: a subscriber never sees what the
     * loss of this machine could take back (docs/ha.md) */
    struct held *held_head, *held_tail;
    uint64_t held_bytes;   /* frames kept by them (at most tail_cache_bytes / 4) */
    struct event *repl_ev; /* the head's deadline */
    uint64_t repl_wm;      /* every record up to this sequence is in MySQL */
    bool repl_known;       /* brk_replicated was called: there is a MySQL */
    bool repl_ok;          /* the drain works now */
    brk_stats_t st;
};

static int64_t mono_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec;
}

/* ---- frames ------------------------------------------------------------ */

static brk_frame_t *frame_new(const void *data, size_t len)
{
    brk_frame_t *f = malloc(sizeof(*f) + len);
    if (!f)
        return NULL;
    f->refs = 1;
    f->len = len;
    memcpy(f->data, data, len);
    return f;
}

void brk_frame_ref(brk_frame_t *f)
{
    f->refs++;
}

void brk_frame_unref(brk_frame_t *f)
{
    if (f && --f->refs == 0)
        free(f);
}

static void pack_cstr(msgpack_packer *pk, const char *s)
{
    size_t n = strlen(s);
    msgpack_pack_str(pk, n);
    msgpack_pack_str_body(pk, s, n);
}

/* The `msg` frame for one record. Encoded once per message; shared. */
/* A msgpack writer into a buffer of known room (frame_msg's frame). */
struct fixed_out {
    uint8_t *p;
    size_t len, cap;
    bool overflow;
};

static int fixed_write(void *data, const char *buf, size_t len)
{
    struct fixed_out *o = data;
    if (len > o->cap - o->len) {
        o->overflow = true;
        return -1;
    }
    memcpy(o->p + o->len, buf, len);
    o->len += len;
    return 0;
}

/* The msg frame, encoded straight into its own allocation: its size is
 * bounded by the lengths (the fixed part is at most 68 bytes). */
static brk_frame_t *frame_msg(const char *stream, size_t stream_len, uint64_t offset, int64_t ts,
                              const uint8_t *headers, size_t headers_len, const uint8_t *payload,
                              size_t payload_len)
{
    size_t cap = 96 + stream_len + payload_len + headers_len;
    brk_frame_t *f = malloc(sizeof(*f) + cap);
    if (!f)
        return NULL;
    f->refs = 1;
    struct fixed_out sb = {f->data, 0, cap, false};
    msgpack_packer pk;
    msgpack_packer_init(&pk, &sb, fixed_write);
    msgpack_pack_map(&pk, headers_len ? 6 : 5);
    pack_cstr(&pk, "t");
    pack_cstr(&pk, "msg");
    pack_cstr(&pk, "stream");
    msgpack_pack_str(&pk, stream_len);
    msgpack_pack_str_body(&pk, stream, stream_len);
    pack_cstr(&pk, "offset");
    msgpack_pack_uint64(&pk, offset);
    pack_cstr(&pk, "ts");
    msgpack_pack_uint64(&pk, ts > 0 ? (uint64_t)ts : 0);
    pack_cstr(&pk, "payload");
    msgpack_pack_bin(&pk, payload_len);
    msgpack_pack_bin_body(&pk, payload, payload_len);
    if (headers_len) {
        /* Headers are stored as the msgpack map the publisher sent. */
        pack_cstr(&pk, "headers");
        fixed_write(&sb, (const char *)headers, headers_len);
    }
    if (sb.overflow) {
        free(f);
        return NULL;
    }
    f->len = sb.len;
    return f;
}

static void send_buf(brk_client_t *c, proto_buf_t *pb)
{
    if (c->closed || !pb->len)
        return;
    if (c->ops->send_bytes) {
        c->ops->send_bytes(c->conn, pb->data, pb->len);
        return;
    }
    brk_frame_t *f = frame_new(pb->data, pb->len);
    if (!f)
        return;
    c->ops->send(c->conn, f);
    brk_frame_unref(f);
}

static void send_nack(brk_client_t *c, uint64_t id, int code, const char *reason)
{
    proto_buf_t pb = {0};
    if (proto_enc_nack(&pb, id, code, reason) == 0)
        send_buf(c, &pb);
    proto_buf_free(&pb);
}

static void send_error(brk_client_t *c, uint64_t id, int code, const char *reason)
{
    proto_buf_t pb = {0};
    if (proto_enc_error(&pb, id, code, reason) == 0)
        send_buf(c, &pb);
    proto_buf_free(&pb);
}

/* ---- streams ----------------------------------------------------------- */

int brk_stream_name_valid(const char *name, size_t len)
{
    if (len == 0 || len > 200 || name[0] == '.' || name[len - 1] == '.')
        return 0;
    for (size_t i = 0; i < len; i++) {
        char ch = name[i];
        bool ok = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
                  (ch >= '0' && ch <= '9') || ch == '.' || ch == '_' || ch == '-';
        if (!ok || (ch == '.' && i + 1 < len && name[i + 1] == '.'))
            return 0;
    }
    return 1;
}

static uint64_t hash_name(const char *s, size_t n)
{
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (size_t i = 0; i < n; i++)
        h = (h ^ (uint8_t)s[i]) * 1099511628211ull;
    return h;
}

static brk_stream_t *stream_find(brk_t *b, const char *name, size_t len)
{
    uint64_t h = hash_name(name, len);
    for (brk_stream_t *s = b->buckets[h % b->n_buckets]; s; s = s->hnext)
        if (s->hash == h && s->name_len == len && memcmp(s->name, name, len) == 0)
            return s;
    return NULL;
}

/* The stream's state, loaded from the WAL's committed metadata. */
static brk_stream_t *stream_get(brk_t *b, const char *name, size_t len)
{
    brk_stream_t *s = stream_find(b, name, len);
    if (s)
        return s;
    s = calloc(1, sizeof(*s));
    if (!s)
        return NULL;
    s->name = malloc(len);
    if (!s->name) {
        free(s);
        return NULL;
    }
    memcpy(s->name, name, len);
    s->name_len = len;
    s->hash = hash_name(name, len);
    wal_stream_info_t info;
    if (wal_stream_get(b->wal, name, len, &info) == 0) {
        s->epoch = info.epoch;
        s->first = info.first_offset;
        s->next = info.next_offset;
    } else {
        s->epoch = 0;
        s->first = s->next = 1;
    }
    s->cache_first = s->next;
    s->used_s = mono_s();
    size_t i = s->hash % b->n_buckets;
    s->hnext = b->buckets[i];
    b->buckets[i] = s;
    b->n_streams++;
    b->st.streams = b->n_streams;
    return s;
}

static void cache_clear(brk_t *b, brk_stream_t *s);

/* Free a stream the broker knows nothing more about than the WAL does: no
 * subscriber, nothing cached that the WAL cannot give back. pp: the link
 * in its bucket that points to it. */
static void stream_destroy(brk_t *b, brk_stream_t **pp)
{
    brk_stream_t *s = *pp;
    *pp = s->hnext;
    cache_clear(b, s);
    free(s->name);
    free(s);
    b->n_streams--;
    b->st.streams = b->n_streams;
}

/* A subscription left s. A stream that does not exist (no epoch) costs
 * nothing once nobody subscribes to it: freed at once. */
static void stream_release(brk_t *b, brk_stream_t *s)
{
    if (s->subs || s->stalled || s->epoch != 0 || s->cache)
        return;
    for (brk_stream_t **pp = &b->buckets[s->hash % b->n_buckets]; *pp; pp = &(*pp)->hnext)
        if (*pp == s) {
            stream_destroy(b, pp);
            return;
        }
}

/*
 * Streams nobody subscribes to and nobody published to for stream_idle_s
 * are freed; stream_get reads their state from the WAL when they are used
 * again. Only once the WAL holds everything the broker knows (LMDB's next
 * offset is ours: no acknowledged record waits in the journal), so that a
 * stream read back is never behind.
 */
static void evict_idle(brk_t *b)
{
    int64_t now = mono_s();
    for (size_t i = 0; i < b->n_buckets; i++) {
        brk_stream_t **pp = &b->buckets[i];
        while (*pp) {
            brk_stream_t *s = *pp;
            if (!s->subs && !s->stalled && !s->held &&
                now - s->used_s >= (int64_t)b->o.stream_idle_s) {
                wal_stream_info_t info;
                int rc = wal_stream_get(b->wal, s->name, s->name_len, &info);
                if ((rc == 0 && info.next_offset == s->next && info.epoch == s->epoch) ||
                    (rc == WAL_ENOTFOUND && s->epoch == 0)) {
                    stream_destroy(b, pp);
                    b->st.streams_evicted++;
                    continue;
                }
            }
            pp = &s->hnext;
        }
    }
}

static void evict_ev_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    evict_idle(arg);
}

/* ---- tail caches --------------------------------------------------------- */

/*
 * Every stream keeps up to tail_cache_msgs frames of its tail, and all of
 * them together at most tail_cache_bytes: a publisher to many streams, or
 * of large messages nobody reads, cannot make the broker hold more. Over
 * the budget the oldest frames of the stream filled least recently go
 * first; a subscriber behind the cache reads the WAL instead (catch-up).
 */
static void lru_unlink(brk_t *b, brk_stream_t *s)
{
    if (s->lru_prev)
        s->lru_prev->lru_next = s->lru_next;
    else if (b->lru_head == s)
        b->lru_head = s->lru_next;
    if (s->lru_next)
        s->lru_next->lru_prev = s->lru_prev;
    else if (b->lru_tail == s)
        b->lru_tail = s->lru_prev;
    s->lru_prev = s->lru_next = NULL;
}

static void lru_touch(brk_t *b, brk_stream_t *s)
{
    if (b->lru_head == s)
        return;
    lru_unlink(b, s);
    s->lru_next = b->lru_head;
    if (b->lru_head)
        b->lru_head->lru_prev = s;
    b->lru_head = s;
    if (!b->lru_tail)
        b->lru_tail = s;
}

/* Drop the oldest cached frame of s; its array goes with the last one. */
static void cache_pop(brk_t *b, brk_stream_t *s)
{
    brk_frame_t **slot = &s->cache[s->cache_first % b->o.tail_cache_msgs];
    if (*slot) {
        s->cache_bytes -= (*slot)->len;
        b->cache_bytes -= (*slot)->len;
        brk_frame_unref(*slot);
        *slot = NULL;
    }
    s->cache_first++;
    if (s->cache_first >= s->next) {
        free(s->cache);
        s->cache = NULL;
        s->cache_first = s->next;
        lru_unlink(b, s);
    }
}

static void cache_clear(brk_t *b, brk_stream_t *s)
{
    if (s->cache) {
        for (uint32_t i = 0; i < b->o.tail_cache_msgs; i++)
            brk_frame_unref(s->cache[i]);
        free(s->cache);
        s->cache = NULL;
        b->cache_bytes -= s->cache_bytes;
        s->cache_bytes = 0;
        lru_unlink(b, s);
    }
    s->cache_first = s->next;
}

static brk_frame_t *cache_get(brk_t *b, brk_stream_t *s, uint64_t off)
{
    if (!s->cache || off < s->cache_first || off >= s->next)
        return NULL;
    return s->cache[off % b->o.tail_cache_msgs];
}

/* A message committed at `off`: append its frame to the tail cache. */
static void cache_put(brk_t *b, brk_stream_t *s, uint64_t off, brk_frame_t *f)
{
    uint32_t cap = b->o.tail_cache_msgs;
    if (off != s->next || !s->cache) {
        /* Not contiguous with what we hold (another writer, or our view was
         * stale), or nothing held: start the cache afresh at this offset. */
        cache_clear(b, s);
        s->cache = calloc(cap, sizeof(*s->cache));
        if (!s->cache) {
            s->next = off + 1;
            s->cache_first = s->next;
            return;
        }
        s->cache_first = off;
    }
    s->next = off + 1;
    if (s->next - s->cache_first > cap)
        cache_pop(b, s); /* the slot of off - cap, which off takes */
    brk_frame_ref(f);
    s->cache[off % cap] = f;
    s->cache_bytes += f->len;
    b->cache_bytes += f->len;
    s->used_s = mono_s();
    lru_touch(b, s);
    while (b->cache_bytes > b->o.tail_cache_bytes && b->lru_tail) {
        cache_pop(b, b->lru_tail);
        b->st.cache_evictions++;
    }
}

/* ---- delivery ---------------------------------------------------------- */

static void deliver_client(brk_client_t *c);
static void sub_free(brk_sub_t *sub);

struct catchup_ctx {
    brk_sub_t *sub;
    uint32_t sent;
};

static int catchup_cb(const wal_record_t *rec, void *arg)
{
    struct catchup_ctx *cc = arg;
    brk_sub_t *sub = cc->sub;
    brk_t *b = sub->client->b;
    brk_frame_t *f =
        frame_msg(sub->stream->name, sub->stream->name_len, rec->offset, rec->timestamp_us,
                  rec->headers, rec->headers_len, rec->payload, rec->payload_len);
    if (!f)
        return 1;
    sub->client->ops->send(sub->client->conn, f);
    b->st.deliveries++;
    b->st.delivered_bytes += f->len;
    brk_frame_unref(f);
    sub->next = rec->offset + 1;
    cc->sent++;
    return 0;
}

/* Deliver what the subscription may receive now. Returns messages sent. */
static uint32_t deliver_sub(brk_sub_t *sub, uint32_t budget)
{
    brk_client_t *c = sub->client;
    brk_t *b = c->b;
    brk_stream_t *s = sub->stream;
    uint32_t sent = 0;
    while (sent < budget && sub->next < s->next && !c->closed && !sub->broken) {
        uint64_t inflight = sub->next - 1 - sub->acked;
        if (inflight >= b->o.max_inflight)
            break;
        if (c->ops->out_pending(c->conn) >= b->o.out_high_watermark)
            break;
        brk_frame_t *f = cache_get(b, s, sub->next);
        if (f) {
            c->ops->send(c->conn, f);
            b->st.deliveries++;
            b->st.delivered_bytes += f->len;
            sub->next++;
            sent++;
            continue;
        }
        /* Behind the tail cache: read the WAL in a bounded batch. */
        uint64_t room = b->o.max_inflight - inflight;
        uint32_t max = (uint32_t)(room < CATCHUP_BATCH ? room : CATCHUP_BATCH);
        if (max > budget - sent)
            max = budget - sent;
        struct catchup_ctx cc = {sub, 0};
        rpl_result_t res;
        b->st.catchup_reads++;
        enum rpl_status rc = rpl_read(b->rpl, sub->rs, s->name, s->name_len, sub->next, max,
                                      CATCHUP_BYTES, catchup_cb, &cc, &res);
        if (rc == RPL_PENDING)
            break; /* MySQL is being read for it: sub_wake continues */
        sent += cc.sent;
        if (rc == RPL_GAP) {
            proto_buf_t pb = {0};
            if (proto_enc_gap(&pb, (const uint8_t *)s->name, s->name_len, res.gap_from,
                              res.gap_to) == 0)
                send_buf(c, &pb);
            proto_buf_free(&pb);
            b->st.gaps++;
            /* The skipped range counts as delivered-and-acked. */
            if (sub->acked < res.gap_to)
                sub->acked = res.gap_to;
            sub->next = res.next;
            continue;
        }
        if (rc != RPL_OK || cc.sent == 0) {
            if ((rc == RPL_OK || rc == RPL_ENOSTREAM) && cc.sent == 0 && !s->stalled) {
                /* Acknowledged (durable in the WAL's journal) but not yet
                 * readable: retry when the WAL says it is. */
                s->stalled = true;
                s->next_stalled = b->stalled;
                b->stalled = s;
            }
            if (rc == RPL_EREAD) {
                /* Never skip it, never retry it in a loop: this subscription
                 * stops here (the operator's arq-replay verify finds the
                 * record); the client hears it once. */
                char why[96];
                snprintf(why, sizeof(why), "stream read failed at offset %llu",
                         (unsigned long long)sub->next);
                sub->broken = true;
                b->st.read_errors++;
                send_error(c, 0, PROTO_CODE_INTERNAL, why);
            }
            break;
        }
    }
    return sent;
}

static void work_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    deliver_client(arg);
}

static void deliver_client(brk_client_t *c)
{
    uint32_t budget = DELIVER_BUDGET;
    bool more = false;
    for (brk_sub_t *sub = c->sub_list; sub && !c->closed; sub = sub->next_in_client) {
        budget -= deliver_sub(sub, budget);
        if (budget == 0) {
            more = true;
            break;
        }
    }
    if (more && c->work)
        event_active(c->work, EV_TIMEOUT, 0); /* continue on the next loop turn */
}

static void mark_dirty(brk_client_t *c);

/* A stream subscribed to before it existed got its first message: its
 * durable subscribers' sessions can now record the subscription (a cursor
 * names an existing stream). */
static void stream_born(brk_stream_t *s, uint64_t epoch)
{
    s->epoch = epoch;
    for (brk_sub_t *sub = s->subs; sub; sub = sub->next_in_stream)
        if (sub->client->durable)
            mark_dirty(sub->client);
}

static void wake_stream(brk_stream_t *s)
{
    for (brk_sub_t *sub = s->subs; sub; sub = sub->next_in_stream)
        deliver_sub(sub, DELIVER_BUDGET);
}

/* The WAL rebuilt its stream heads after a fold it had to defer for lack
 * of space (wal_reloads): the folded entries may have added records the
 * broker never saw committed. Take each known stream's metadata again and
 * let its subscribers read on from the WAL. */
static void streams_reload(brk_t *b)
{
    for (size_t i = 0; i < b->n_buckets; i++) {
        for (brk_stream_t *s = b->buckets[i]; s; s = s->hnext) {
            wal_stream_info_t info;
            if (wal_stream_get(b->wal, s->name, s->name_len, &info) != 0)
                continue;
            if (s->epoch == 0)
                stream_born(s, info.epoch);
            s->epoch = info.epoch;
            s->first = info.first_offset;
            if (info.next_offset > s->next) {
                s->next = info.next_offset;
                cache_clear(b, s);
            }
            wake_stream(s);
        }
    }
}

static void repl_kick(brk_t *b);

/* The WAL made more records readable: retry the subscribers that waited. */
static void brk_visible(void *arg)
{
    brk_t *b = arg;
    /* the drain reads what is readable: replicated publishes and held
     * deliveries wait for it */
    repl_kick(b);
    uint64_t reloads = wal_reloads(b->wal);
    if (reloads != b->reloads) {
        b->reloads = reloads;
        streams_reload(b);
    }
    brk_stream_t *s = b->stalled;
    b->stalled = NULL;
    while (s) {
        brk_stream_t *next = s->next_stalled;
        s->stalled = false;
        s->next_stalled = NULL;
        wake_stream(s);
        s = next;
    }
}

/* ---- clients ----------------------------------------------------------- */

static char **dup_patterns(char *const *p, size_t n)
{
    char **out = calloc(n ? n : 1, sizeof(*out));
    if (!out)
        return NULL;
    for (size_t i = 0; i < n; i++) {
        out[i] = strdup(p[i]);
        if (!out[i]) {
            for (size_t j = 0; j < i; j++)
                free(out[j]);
            free(out);
            return NULL;
        }
    }
    return out;
}

static void free_patterns(char **p, size_t n)
{
    for (size_t i = 0; p && i < n; i++)
        free(p[i]);
    free(p);
}

void brk_set_limits(brk_t *b, uint32_t max_payload, uint32_t max_subscriptions,
                    uint32_t max_inflight, size_t out_high_watermark)
{
    if (max_payload)
        b->o.max_payload = max_payload;
    if (max_subscriptions)
        b->o.max_subscriptions = max_subscriptions;
    if (max_inflight)
        b->o.max_inflight = max_inflight;
    if (out_high_watermark)
        b->o.out_high_watermark = out_high_watermark;
}

int brk_client_set_perms(brk_client_t *c, char *const *pub, size_t n_pub, char *const *subs,
                         size_t n_subs)
{
    bool pub_all = n_pub == (size_t)-1, subs_all = n_subs == (size_t)-1;
    char **np = pub_all ? NULL : dup_patterns(pub, n_pub);
    char **ns = subs_all ? NULL : dup_patterns(subs, n_subs);
    if ((!pub_all && !np) || (!subs_all && !ns)) {
        free_patterns(np, pub_all ? 0 : n_pub);
        free_patterns(ns, subs_all ? 0 : n_subs);
        return -1;
    }
    free_patterns(c->pub, c->n_pub);
    free_patterns(c->subs, c->n_subs);
    c->pub_all = pub_all;
    c->subs_all = subs_all;
    c->pub = np;
    c->n_pub = pub_all ? 0 : n_pub;
    c->subs = ns;
    c->n_subs = subs_all ? 0 : n_subs;
    return 0;
}

int brk_client_new(brk_t *b, const brk_client_ops_t *ops, void *conn, const char *session,
                   const char *producer, char *const *pub, size_t n_pub, char *const *subs,
                   size_t n_subs, brk_client_t **ret)
{
    brk_client_t *c = calloc(1, sizeof(*c));
    if (!c)
        return -1;
    c->b = b;
    c->ops = ops;
    c->conn = conn;
    c->refs = 1;
    c->producer = strdup(producer ? producer : "");
    c->session = strdup(session ? session : "");
    c->pub_all = n_pub == (size_t)-1;
    c->subs_all = n_subs == (size_t)-1;
    if (!c->pub_all) {
        c->pub = dup_patterns(pub, n_pub);
        c->n_pub = n_pub;
    }
    if (!c->subs_all) {
        c->subs = dup_patterns(subs, n_subs);
        c->n_subs = n_subs;
    }
    c->work = event_new(b->base, -1, 0, work_cb, c);
    if (!c->producer || !c->session || (!c->pub_all && !c->pub) || (!c->subs_all && !c->subs) ||
        !c->work) {
        free(c->producer);
        free(c->session);
        free_patterns(c->pub, c->n_pub);
        free_patterns(c->subs, c->n_subs);
        if (c->work)
            event_free(c->work);
        free(c);
        return -1;
    }
    *ret = c;
    return 0;
}

static void client_unref(brk_client_t *c)
{
    if (--c->refs > 0)
        return;
    free(c->owner);
    free(c->producer);
    free(c->session);
    free_patterns(c->pub, c->n_pub);
    free_patterns(c->subs, c->n_subs);
    free(c);
}

static void sub_unlink(brk_sub_t *sub)
{
    brk_stream_t *s = sub->stream;
    if (sub->prev_in_stream)
        sub->prev_in_stream->next_in_stream = sub->next_in_stream;
    else
        s->subs = sub->next_in_stream;
    if (sub->next_in_stream)
        sub->next_in_stream->prev_in_stream = sub->prev_in_stream;
}

/* ---- durable cursors -------------------------------------------------- */

static void mark_dirty(brk_client_t *c)
{
    if (c->dirty || c->closed)
        return;
    c->dirty = true;
    c->next_dirty = c->b->dirty;
    c->b->dirty = c;
    c->refs++;
}

static void cursors_retry(brk_t *b);

static void cursor_done(wal_append_t *req, void *arg)
{
    brk_t *b = arg;
    if (wal_append_status(req) == 0) {
        b->st.cursor_commits++;
    } else {
        b->st.cursor_errors++;
        cursors_retry(b);
    }
    wal_append_free(req);
}

/* Add the client's unpersisted acks to req. Returns how many. */
static size_t cursor_collect(brk_client_t *c, wal_append_t *req)
{
    size_t n = 0;
    if (!c->session[0] || c->ephemeral)
        return 0;
    for (brk_sub_t *sub = c->sub_list; sub; sub = sub->next_in_client) {
        bool record = c->durable && !sub->recorded && sub->stream->epoch != 0;
        if (sub->acked <= sub->persisted && !record)
            continue;
        /* The WAL fails a request whose cursor names a stream it does not
         * hold: only streams the broker saw committed (epoch set). */
        if (sub->stream->epoch == 0)
            continue;
        if (wal_append_add_cursor(req, c->session, strlen(c->session), sub->stream->name,
                                  sub->stream->name_len, sub->acked) != 0)
            continue;
        sub->persisted = sub->acked;
        sub->recorded = true;
        n++;
    }
    c->dirty = false;
    return n;
}

static void cursor_submit(brk_t *b, wal_append_t *req, size_t n)
{
    if (n && wal_append_submit(b->wal, req) == 0) {
        b->st.cursors_persisted += n;
        return;
    }
    if (n)
        b->st.cursor_errors++;
    wal_append_free(req);
}

void brk_flush(brk_t *b)
{
    wal_append_t *req = NULL;
    size_t n = 0;
    if (b->dirty && wal_append_new(cursor_done, b, &req) != 0)
        return;
    while (b->dirty) {
        brk_client_t *c = b->dirty;
        b->dirty = c->next_dirty;
        c->next_dirty = NULL;
        if (c->dirty && !c->closed)
            n += cursor_collect(c, req);
        c->dirty = false;
        client_unref(c); /* the dirty list's reference */
    }
    if (req)
        cursor_submit(b, req, n);
}

static void flush_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    brk_flush(arg);
}

/* ---- sessions ---------------------------------------------------------- */

static brk_sub_t *sub_find(brk_client_t *c, brk_stream_t *s)
{
    for (brk_sub_t *sub = c->sub_list; sub; sub = sub->next_in_client)
        if (sub->stream == s)
            return sub;
    return NULL;
}

static brk_client_t **sess_slot(brk_t *b, const char *id)
{
    return &b->sess[hash_name(id, strlen(id)) % b->n_sess_buckets];
}

static brk_client_t *sess_find(brk_t *b, const char *id)
{
    for (brk_client_t *c = *sess_slot(b, id); c; c = c->snext)
        if (strcmp(c->session, id) == 0)
            return c;
    return NULL;
}

static void sess_insert(brk_client_t *c)
{
    brk_client_t **slot = sess_slot(c->b, c->session);
    c->snext = *slot;
    *slot = c;
    c->in_table = true;
    c->b->st.sessions_live++;
}

static void sess_remove(brk_client_t *c)
{
    if (!c->in_table)
        return;
    for (brk_client_t **pp = sess_slot(c->b, c->session); *pp; pp = &(*pp)->snext) {
        if (*pp == c) {
            *pp = c->snext;
            break;
        }
    }
    c->snext = NULL;
    c->in_table = false;
    c->b->st.sessions_live--;
}

/* A write of cursors failed (storage full, say): which of them is not
 * known, so every live session's cursors and subscriptions are written
 * again at the next flush. Without this a resume after the failure would
 * restart from older offsets, or miss subscriptions. */
static void cursors_retry(brk_t *b)
{
    for (size_t i = 0; i < b->n_sess_buckets; i++) {
        for (brk_client_t *c = b->sess[i]; c; c = c->snext) {
            if (c->closed)
                continue;
            for (brk_sub_t *sub = c->sub_list; sub; sub = sub->next_in_client) {
                sub->persisted = 0;
                sub->recorded = false;
            }
            mark_dirty(c);
        }
    }
}

static int64_t wall_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* Add "session c was connected at `seen`" to req. */
static int session_put(brk_client_t *c, wal_append_t *req, int64_t seen)
{
    wal_session_t ws = {.created_us = c->created_us, .seen_us = seen};
    size_t olen = strlen(c->owner);
    ws.owner_len = (uint8_t)(olen > WAL_PRODUCER_MAX ? WAL_PRODUCER_MAX : olen);
    memcpy(ws.owner, c->owner, ws.owner_len);
    ws.secret_len = c->secret_len;
    memcpy(ws.secret, c->secret, c->secret_len);
    return wal_append_put_session(req, c->session, strlen(c->session), &ws);
}

static bool secret_eq(const uint8_t *a, size_t alen, const uint8_t *b, size_t blen)
{
    if (alen != blen)
        return false;
    uint8_t d = 0; /* constant time in the length */
    for (size_t i = 0; i < alen; i++)
        d |= a[i] ^ b[i];
    return d == 0;
}

static bool session_id_ok(const char *id)
{
    size_t n = strlen(id);
    return n > 0 && n <= WAL_SESSION_MAX;
}

int brk_session_resumable(brk_t *b, const char *id, const char *owner, const uint8_t *secret,
                          size_t secret_len)
{
    if (!session_id_ok(id) || secret_len > WAL_SECRET_MAX)
        return 0;
    owner = owner ? owner : "";
    brk_client_t *live = sess_find(b, id);
    if (live)
        return strcmp(live->owner, owner) == 0 &&
               secret_eq(live->secret, live->secret_len, secret, secret_len);
    wal_session_t ws;
    if (wal_session_get(b->wal, id, strlen(id), &ws) != 0)
        return 0;
    if (ws.owner_len != strlen(owner) || memcmp(ws.owner, owner, ws.owner_len) != 0)
        return 0;
    if (!secret_eq(ws.secret, ws.secret_len, secret, secret_len))
        return 0;
    return ws.seen_us + (int64_t)b->o.session_ttl_s * 1000000 >= wall_us();
}

static int session_adopt(brk_client_t *c, const char *owner, const uint8_t *secret,
                         size_t secret_len, int64_t created_us)
{
    if (c->durable || !session_id_ok(c->session) || secret_len > WAL_SECRET_MAX)
        return -1;
    c->owner = strdup(owner ? owner : "");
    if (!c->owner)
        return -1;
    memcpy(c->secret, secret, secret_len);
    c->secret_len = (uint8_t)secret_len;
    c->created_us = created_us;
    c->durable = true;
    sess_insert(c);
    return 0;
}

static void session_record(brk_client_t *c)
{
    wal_append_t *req;
    if (wal_append_new(cursor_done, c->b, &req) != 0)
        return;
    size_t n = session_put(c, req, wall_us()) == 0;
    cursor_submit(c->b, req, n);
}

static void session_created(wal_append_t *req, void *arg)
{
    brk_client_t *c = arg;
    int status = wal_append_status(req);
    if (status == 0)
        c->b->st.cursor_commits++;
    else
        c->b->st.cursor_errors++;
    wal_append_free(req);
    if (!c->closed && c->ops->session_durable)
        c->ops->session_durable(c->conn, status);
    client_unref(c);
}

static int session_live(const char *id, void *arg)
{
    return sess_find(arg, id) != NULL;
}

static int64_t mono_now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* The session limits of owner (or, anonymous, of addr): make room (evict
 * the owner's oldest session that no connection holds) or refuse. */
static int session_admit(brk_t *b, const char *owner, const char *addr)
{
    const char *key = owner && owner[0] ? owner : addr ? addr : "";
    int is_addr = !(owner && owner[0]);
    char evict[WAL_SESSION_MAX + 1];
    enum brk_owners_verdict v =
        brk_owners_admit(b->owners, key, is_addr, mono_now_us(), session_live, b, evict);
    if (v == BRK_OWNERS_TOO_FAST || v == BRK_OWNERS_TOO_MANY) {
        b->st.sessions_refused++;
        return v == BRK_OWNERS_TOO_FAST ? BRK_ESESSION_RATE : BRK_ESESSION_LIMIT;
    }
    if (v == BRK_OWNERS_EVICT) {
        wal_append_t *req;
        if (wal_append_new(cursor_done, b, &req) == 0)
            cursor_submit(b, req, wal_append_del_session(req, evict, strlen(evict)) == 0);
        brk_owners_remove(b->owners, evict);
        b->st.sessions_evicted++;
    }
    return 0;
}

int brk_session_create(brk_client_t *c, const char *owner, const char *addr, const uint8_t *secret,
                       size_t secret_len)
{
    if (c->ephemeral || c->durable)
        return WAL_EINVAL;
    int lrc = session_admit(c->b, owner, addr);
    if (lrc)
        return lrc;
    if (session_adopt(c, owner, secret, secret_len, wall_us()) != 0)
        return WAL_ENOMEM;
    (void)brk_owners_add(c->b->owners,
                         owner && owner[0] ? owner
                         : addr            ? addr
                                           : "",
                         !(owner && owner[0]), c->session);
    c->b->st.sessions_created++;
    /* Complete at the durable point (the journal's sync), not at the fold. */
    wal_append_t *req;
    if (wal_append_new(session_created, c, &req) != 0)
        return WAL_ENOMEM;
    wal_append_when_durable(req);
    int rc = session_put(c, req, wall_us());
    if (rc == 0)
        rc = wal_append_submit(c->b->wal, req);
    if (rc) {
        c->b->st.cursor_errors++;
        wal_append_free(req);
        return rc;
    }
    c->b->st.cursors_persisted++;
    c->refs++;
    return 0;
}

void brk_client_ephemeral(brk_client_t *c)
{
    if (!c->durable)
        c->ephemeral = true;
}

/* Stop a client's activity for good: no more sends, subscriptions gone.
 * Its pending publishes still complete (silently). */
static void client_detach(brk_client_t *c)
{
    if (c->closed)
        return;
    c->closed = true;
    sess_remove(c);
    brk_sub_t *sub = c->sub_list;
    while (sub) {
        brk_sub_t *next = sub->next_in_client;
        brk_stream_t *st = sub->stream;
        sub_unlink(sub);
        sub_free(sub);
        stream_release(c->b, st);
        c->b->st.subscriptions--;
        sub = next;
    }
    c->sub_list = NULL;
    c->n_sub = 0;
    event_free(c->work);
    c->work = NULL;
}

/* A cold-tier read for the subscription finished: go on delivering. */
static void sub_wake(void *arg)
{
    brk_sub_t *sub = arg;
    if (!sub->client->closed)
        deliver_sub(sub, DELIVER_BUDGET);
}

static void sub_free(brk_sub_t *sub)
{
    rpl_sub_free(sub->rs);
    free(sub);
}

static brk_sub_t *sub_add(brk_client_t *c, brk_stream_t *s, uint64_t next, uint64_t acked)
{
    brk_sub_t *sub = calloc(1, sizeof(*sub));
    if (!sub)
        return NULL;
    sub->rs = rpl_sub_new(c->b->rpl, sub_wake, sub);
    if (!sub->rs) {
        free(sub);
        return NULL;
    }
    sub->client = c;
    sub->stream = s;
    sub->next = next;
    sub->acked = acked;
    sub->persisted = acked;
    sub->next_in_stream = s->subs;
    if (s->subs)
        s->subs->prev_in_stream = sub;
    s->subs = sub;
    /* Keep the client's list in subscription order (fair delivery). */
    brk_sub_t **tail = &c->sub_list;
    while (*tail)
        tail = &(*tail)->next_in_client;
    *tail = sub;
    c->n_sub++;
    c->b->st.subscriptions++;
    return sub;
}

/* A subscription to restore: from the WAL's cursor and/or the connection
 * that held the session until now. */
struct restore {
    char *stream;
    size_t stream_len;
    uint64_t acked;   /* the highest acked offset known */
    uint64_t durable; /* the WAL's cursor (0 if none) */
    bool recorded;
    bool kept; /* restored (or kept out only for lack of memory) */
};

struct restore_set {
    struct restore *v;
    size_t n, cap;
};

static void restore_set_free(struct restore_set *rs)
{
    for (size_t i = 0; i < rs->n; i++)
        free(rs->v[i].stream);
    free(rs->v);
    rs->v = NULL;
    rs->n = rs->cap = 0;
}

static struct restore *restore_get(struct restore_set *rs, const char *stream, size_t len)
{
    for (size_t i = 0; i < rs->n; i++)
        if (rs->v[i].stream_len == len && memcmp(rs->v[i].stream, stream, len) == 0)
            return &rs->v[i];
    if (rs->n == rs->cap) {
        size_t ncap = rs->cap ? rs->cap * 2 : 8;
        struct restore *nv = realloc(rs->v, ncap * sizeof(*nv));
        if (!nv)
            return NULL;
        rs->v = nv;
        rs->cap = ncap;
    }
    struct restore *r = &rs->v[rs->n];
    r->stream = malloc(len ? len : 1);
    if (!r->stream)
        return NULL;
    memcpy(r->stream, stream, len);
    r->stream_len = len;
    r->acked = r->durable = 0;
    r->recorded = r->kept = false;
    rs->n++;
    return r;
}

static int restore_cursor_cb(const char *stream, size_t len, uint64_t offset, int64_t updated,
                             void *arg)
{
    (void)updated;
    struct restore *r = restore_get(arg, stream, len);
    if (r) {
        r->durable = offset;
        r->recorded = true;
        if (offset > r->acked)
            r->acked = offset;
    }
    return 0;
}

/*
 * A durable session's connection closed: until the WAL has written that
 * connection's last changes (its acks, subscriptions, unsubscriptions),
 * what the session held is kept here, so that a resume right after the
 * close sees all of it and not the WAL's older state. Freed when the write
 * completes, or taken by a resume. One whose write failed stays until a
 * resume takes it; at most HANDOFF_MAX are kept (the oldest go first).
 */
struct handoff {
    brk_t *b;
    char *session;
    int64_t created_us;
    struct restore_set subs; /* acked offsets; epoch-0 streams included */
    bool pending;            /* the write's completion is still to come */
    bool listed;             /* on b->handoff_head..tail */
    /* it holds a subscription to a stream that does not exist yet, which
     * no cursor can record: kept after the write, until a resume takes it */
    bool unborn;
    struct handoff *prev, *next;
};
#define HANDOFF_MAX 4096u

static void handoff_free(struct handoff *h)
{
    restore_set_free(&h->subs);
    free(h->session);
    free(h);
}

/* Off the list; freed now unless its write's completion is still to come. */
static void handoff_release(brk_t *b, struct handoff *h)
{
    if (h->listed) {
        if (h->prev)
            h->prev->next = h->next;
        else
            b->handoff_head = h->next;
        if (h->next)
            h->next->prev = h->prev;
        else
            b->handoff_tail = h->prev;
        h->prev = h->next = NULL;
        h->listed = false;
        b->n_handoffs--;
    }
    if (!h->pending)
        handoff_free(h);
}

static struct handoff *handoff_find(brk_t *b, const char *session)
{
    for (struct handoff *h = b->handoff_tail; h; h = h->prev)
        if (strcmp(h->session, session) == 0)
            return h;
    return NULL;
}

static void handoff_done(wal_append_t *req, void *arg)
{
    struct handoff *h = arg;
    brk_t *b = h->b;
    int status = wal_append_status(req);
    wal_append_free(req);
    h->pending = false;
    if (status == 0) {
        b->st.cursor_commits++;
        if (!h->unborn || !h->listed)
            handoff_release(b, h); /* the WAL holds it all now (or a resume took it) */
    } else {
        b->st.cursor_errors++;
        if (!h->listed)
            handoff_free(h);
        cursors_retry(b);
    }
}

/* What c's session holds as it closes (NULL without memory: a resume then
 * reads the WAL, as it would once the write is done). */
static struct handoff *handoff_new(brk_client_t *c)
{
    brk_t *b = c->b;
    struct handoff *h = calloc(1, sizeof(*h));
    if (!h || !(h->session = strdup(c->session))) {
        free(h);
        return NULL;
    }
    h->b = b;
    h->created_us = c->created_us;
    for (brk_sub_t *sub = c->sub_list; sub; sub = sub->next_in_client) {
        struct restore *r = restore_get(&h->subs, sub->stream->name, sub->stream->name_len);
        if (!r) {
            handoff_free(h);
            return NULL;
        }
        r->acked = sub->acked;
        h->unborn |= sub->stream->epoch == 0;
    }
    struct handoff *old = handoff_find(b, c->session);
    if (old)
        handoff_release(b, old);
    if (b->n_handoffs >= HANDOFF_MAX)
        handoff_release(b, b->handoff_head);
    h->prev = b->handoff_tail;
    if (b->handoff_tail)
        b->handoff_tail->next = h;
    else
        b->handoff_head = h;
    b->handoff_tail = h;
    h->listed = true;
    b->n_handoffs++;
    return h;
}

/*
 * The session's subscriptions are what its last connection held: the live
 * one being taken over, else the one that just closed (its handoff), else
 * the WAL's cursors. The WAL's cursors say what is already written. A
 * subscription the new token does not allow, or beyond max_subscriptions,
 * ends here: its cursor is deleted, so that the WAL always holds the
 * session's subscriptions and nothing else.
 */
size_t brk_session_resume(brk_client_t *c, const char *owner, const uint8_t *secret,
                          size_t secret_len)
{
    brk_t *b = c->b;
    struct restore_set rs = {0}, written = {0};
    int64_t created = wall_us();
    bool held = false; /* rs comes from a connection, not the WAL */
    brk_client_t *live = sess_find(b, c->session);
    if (live == c)
        return 0;
    (void)wal_session_cursors(b->wal, c->session, strlen(c->session), restore_cursor_cb, &written);
    if (live) {
        /* Its in-memory acks are the newest; take them, then its place. */
        created = live->created_us;
        held = true;
        for (brk_sub_t *sub = live->sub_list; sub; sub = sub->next_in_client) {
            struct restore *r = restore_get(&rs, sub->stream->name, sub->stream->name_len);
            if (r)
                r->acked = sub->acked;
        }
        client_detach(live);
        b->st.sessions_taken_over++;
        if (live->ops->kick)
            live->ops->kick(live->conn);
    } else {
        struct handoff *h = handoff_find(b, c->session);
        if (h) {
            created = h->created_us;
            held = true;
            rs = h->subs;
            h->subs = (struct restore_set){0};
            handoff_release(b, h);
        } else {
            wal_session_t ws;
            if (wal_session_get(b->wal, c->session, strlen(c->session), &ws) == 0)
                created = ws.created_us;
        }
    }
    for (size_t i = 0; i < written.n; i++) {
        struct restore *w = &written.v[i];
        struct restore *r = NULL;
        for (size_t j = 0; j < rs.n && !r; j++)
            if (rs.v[j].stream_len == w->stream_len &&
                memcmp(rs.v[j].stream, w->stream, w->stream_len) == 0)
                r = &rs.v[j];
        if (!r && !held)
            r = restore_get(&rs, w->stream, w->stream_len);
        if (!r)
            continue; /* unsubscribed by the last connection */
        r->durable = w->durable;
        r->recorded = true;
        if (w->acked > r->acked)
            r->acked = w->acked;
        w->kept = true;
    }
    size_t restored = 0;
    if (session_adopt(c, owner, secret, secret_len, created) == 0) {
        b->st.sessions_resumed++;
        for (size_t i = 0; i < rs.n; i++) {
            struct restore *r = &rs.v[i];
            if (c->n_sub >= b->o.max_subscriptions ||
                !brk_stream_name_valid(r->stream, r->stream_len) ||
                (!c->subs_all &&
                 !proto_pattern_match(c->subs, c->n_subs, r->stream, r->stream_len)))
                continue; /* ends: the client may subscribe again itself */
            r->kept = true;
            brk_stream_t *st = stream_get(b, r->stream, r->stream_len);
            if (!st || sub_find(c, st))
                continue;
            brk_sub_t *sub = sub_add(c, st, r->acked + 1, r->acked);
            if (!sub)
                continue;
            sub->persisted = r->durable;
            sub->recorded = r->recorded;
            if (sub->acked > sub->persisted || !sub->recorded)
                mark_dirty(c);
            restored++;
        }
        /* The cursors of subscriptions that ended, before the session's
         * record (so that a resume after a crash sees the same). */
        wal_append_t *req;
        if (wal_append_new(cursor_done, b, &req) == 0) {
            size_t n = 0;
            for (size_t i = 0; i < rs.n; i++)
                if (!rs.v[i].kept)
                    n += wal_append_del_cursor(req, c->session, strlen(c->session), rs.v[i].stream,
                                               rs.v[i].stream_len) == 0;
            for (size_t i = 0; i < written.n; i++)
                if (!written.v[i].kept)
                    n += wal_append_del_cursor(req, c->session, strlen(c->session),
                                               written.v[i].stream, written.v[i].stream_len) == 0;
            if (n)
                (void)session_put(c, req, wall_us());
            cursor_submit(b, req, n);
            if (n == 0)
                session_record(c);
        } else {
            session_record(c);
        }
    }
    restore_set_free(&rs);
    restore_set_free(&written);
    return restored;
}

void brk_client_subs(const brk_client_t *c, brk_sub_cb cb, void *arg)
{
    for (const brk_sub_t *sub = c->sub_list; sub; sub = sub->next_in_client)
        cb(sub->stream->name, sub->stream->name_len, sub->stream->epoch, sub->acked,
           sub->stream->next, arg);
}

void brk_client_start(brk_client_t *c)
{
    if (!c->closed)
        deliver_client(c);
}

/* ---- expiry ---------------------------------------------------------- */

struct expire_ctx {
    brk_t *b;
    wal_append_t *req;
    int64_t now, ttl_us;
    size_t n_del, n_put;
};

static int expire_cb(const char *id, size_t len, const wal_session_t *ws, void *arg)
{
    struct expire_ctx *x = arg;
    char name[WAL_SESSION_MAX + 1];
    memcpy(name, id, len);
    name[len] = 0;
    brk_client_t *live = strlen(name) == len ? sess_find(x->b, name) : NULL;
    if (live) {
        /* A long connection: refresh when it is seen, so that a crash of
         * arqd does not expire it early. */
        if (ws->seen_us + x->ttl_us / 2 < x->now && session_put(live, x->req, x->now) == 0)
            x->n_put++;
    } else if (ws->seen_us + x->ttl_us < x->now) {
        if (wal_append_del_session(x->req, id, len) == 0) {
            x->n_del++;
            if (strlen(name) == len)
                brk_owners_remove(x->b->owners, name);
        }
    }
    return x->n_del + x->n_put >= 1000; /* the rest on the next pass */
}

void brk_sessions_expire(brk_t *b)
{
    struct expire_ctx x = {
        .b = b, .now = wall_us(), .ttl_us = (int64_t)b->o.session_ttl_s * 1000000};
    if (wal_append_new(cursor_done, b, &x.req) != 0)
        return;
    (void)wal_session_list(b->wal, expire_cb, &x);
    b->st.sessions_expired += x.n_del;
    cursor_submit(b, x.req, x.n_del + x.n_put);
}

static void expire_ev_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    brk_sessions_expire(arg);
}

void brk_client_close(brk_client_t *c)
{
    if (!c)
        return;
    if (!c->closed && (c->dirty || (c->durable && c->in_table))) {
        /* Its acks, and when the session was last connected, go out now
         * (the dirty list drops it at the next flush); until they are
         * written, a resume takes the session's state from the handoff. */
        brk_t *b = c->b;
        struct handoff *h = c->durable && c->in_table ? handoff_new(c) : NULL;
        wal_append_t *req;
        if (wal_append_new(h ? handoff_done : cursor_done, h ? (void *)h : (void *)b, &req) == 0) {
            size_t n = cursor_collect(c, req);
            if (c->durable && c->in_table && session_put(c, req, wall_us()) == 0)
                n++;
            if (n && wal_append_submit(b->wal, req) == 0) {
                b->st.cursors_persisted += n;
                if (h)
                    h->pending = true;
            } else {
                if (n)
                    b->st.cursor_errors++;
                wal_append_free(req);
            }
        }
    }
    client_detach(c);
    client_unref(c);
}

size_t brk_client_pending(const brk_client_t *c)
{
    return c->pending_pubs;
}

void brk_client_writable(brk_client_t *c)
{
    if (!c->closed)
        deliver_client(c);
}

/* ---- publish ----------------------------------------------------------- */

struct pub_ctx {
    brk_t *b;
    brk_client_t *c; /* NULL for the server API */
    uint64_t id;
    int ack;               /* BRK_ACK_LOCAL or BRK_ACK_REPLICATED */
    struct pub_ctx *rnext; /* in b->repl_head's list */
    uint64_t target;       /* replicated: answered once MySQL holds this sequence */
    int64_t deadline;      /* replicated: CLOCK_MONOTONIC us of the timeout */
    uint64_t offset;       /* replicated: the result, kept while waiting */
    int duplicate;
    size_t stream_len;
    int64_t ts;      /* CLOCK_REALTIME: the record's time stamp */
    int64_t t0_mono; /* CLOCK_MONOTONIC: for the latency histograms */
    brk_api_cb api_cb;
    void *api_arg;
    char stream[]; /* one allocation per publish: the name lives here */
};

static int64_t now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

const uint64_t brk_pub_us_bounds[WAL_HIST_BUCKETS - 1] = {
    25,    50,    100,    250,    500,    1000,    2500,    5000,    10000,
    25000, 50000, 100000, 200000, 500000, 1000000, 2500000, 5000000, 10000000};

static int64_t mono_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static void pub_hist(uint64_t *buckets, uint64_t *sum, int64_t us)
{
    uint64_t v = us > 0 ? (uint64_t)us : 0;
    size_t i = 0;
    while (i < WAL_HIST_BUCKETS - 1 && v > brk_pub_us_bounds[i])
        i++;
    buckets[i]++;
    *sum += v;
}

/* Where an acknowledged publish spent its time in arqd (brk_stats_t). */
static void pub_times(brk_t *b, const struct pub_ctx *p, const wal_append_t *req)
{
    int64_t taken, done, now = mono_us();
    wal_append_times(req, &taken, &done);
    if (!taken || !done)
        return;
    pub_hist(b->st.pub_wait_us, &b->st.pub_wait_us_sum, taken - p->t0_mono);
    pub_hist(b->st.pub_dispatch_us, &b->st.pub_dispatch_us_sum, now - done);
    pub_hist(b->st.pub_total_us, &b->st.pub_total_us_sum, now - p->t0_mono);
}

static int wal_code(int status)
{
    switch (status) {
    case WAL_EFULL:
    case WAL_EFATAL:
    case WAL_ECLOSED:
    case WAL_EBUSY:
        return PROTO_CODE_UNAVAILABLE;
    case WAL_EINVAL:
    case BRK_EREPL_NONE:
        return PROTO_CODE_BAD_REQUEST;
    case BRK_EREPL_DOWN:
    case BRK_EREPL_TIMEOUT:
        return PROTO_CODE_UNAVAILABLE;
    default:
        return PROTO_CODE_INTERNAL;
    }
}

static const char *wal_reason(int status)
{
    switch (status) {
    case WAL_EFULL:
        return "storage full";
    case WAL_EFATAL:
        return "storage stopped";
    case WAL_ECLOSED:
        return "shutting down";
    case BRK_EREPL_DOWN:
        return "replication unavailable";
    case BRK_EREPL_TIMEOUT:
        return "replication timeout";
    case BRK_EREPL_NONE:
        return "replication not configured";
    default:
        return wal_strerror(status);
    }
}

void brk_refusal(int status, int *ret_code, const char **ret_reason)
{
    *ret_code = wal_code(status);
    *ret_reason = wal_reason(status);
}

/* The answer to a publish: puback or nack to its client (if still there),
 * or the server API's callback; then p is freed. */
static void pub_answer(brk_t *b, struct pub_ctx *p, int status)
{
    if (p->c && !p->c->closed) {
        proto_buf_t *pb = &b->reply;
        proto_buf_reset(pb);
        int erc = status == 0 ? proto_enc_puback(pb, p->id, (const uint8_t *)p->stream,
                                                 p->stream_len, p->offset, p->duplicate)
                              : proto_enc_nack(pb, p->id, wal_code(status), wal_reason(status));
        if (erc == 0)
            send_buf(p->c, pb);
    }
    if (p->api_cb)
        p->api_cb(status, status == 0 ? p->offset : 0, status == 0 ? p->duplicate : 0, p->api_arg);
    if (p->c) {
        p->c->pending_pubs--;
        if (!p->c->closed && p->c->ops->on_drain)
            p->c->ops->on_drain(p->c->conn);
        client_unref(p->c);
    }
    free(p);
}

/* A replicated publish answered: counted, and its decoded -> puback time. */
static void repl_count_acked(brk_t *b, const struct pub_ctx *p, int64_t now)
{
    b->st.repl_acked++;
    pub_hist(b->st.pub_repl_us, &b->st.pub_repl_us_sum, now - p->t0_mono);
}

static void repl_arm(brk_t *b)
{
    if (!b->repl_head) {
        event_del(b->repl_ev);
        return;
    }
    int64_t left = b->repl_head->deadline - mono_us();
    if (left < 0)
        left = 0;
    struct timeval tv = {(time_t)(left / 1000000), (suseconds_t)(left % 1000000)};
    event_add(b->repl_ev, &tv);
}

/* Answer the waiting publishes MySQL now holds, and those out of time. */
static void repl_release(brk_t *b)
{
    int64_t now = mono_us();
    while (b->repl_head) {
        struct pub_ctx *p = b->repl_head;
        int status;
        if (p->target <= b->repl_wm) {
            status = 0;
            repl_count_acked(b, p, now);
        } else if (p->deadline <= now) {
            status = BRK_EREPL_TIMEOUT;
            b->st.repl_timeouts++;
        } else {
            break;
        }
        b->repl_head = p->rnext;
        if (!b->repl_head)
            b->repl_tail = NULL;
        b->st.repl_waiting--;
        pub_answer(b, p, status);
    }
    repl_arm(b);
}

static void repl_ev_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    repl_release(arg);
}

static void held_release(brk_t *b);

void brk_replicated(brk_t *b, uint64_t watermark, int ok)
{
    b->repl_known = true;
    b->repl_ok = ok != 0;
    if (watermark > b->repl_wm)
        b->repl_wm = watermark;
    held_release(b);
    repl_release(b);
}

/* There is a MySQL and the drain works now. */
static bool repl_up(const brk_t *b)
{
    return b->repl_known && b->repl_ok;
}

int brk_replication_down(const brk_t *b)
{
    return b->o.ack == BRK_ACK_REPLICATED && !repl_up(b);
}

/* Something waits for the drain (a puback or a delivery): wake it rather
 * than let it sleep out its idle poll. */
static void repl_kick(brk_t *b)
{
    if ((b->repl_head || b->held_head) && b->o.repl_kick)
        b->o.repl_kick(b->o.repl_kick_arg);
}

/* Wait for MySQL: the puback goes when the watermark reaches target. */
static void repl_wait(brk_t *b, struct pub_ctx *p, uint64_t target)
{
    p->target = target;
    p->deadline = mono_us() + (int64_t)b->o.ack_timeout_ms * 1000;
    p->rnext = NULL;
    bool first = !b->repl_head;
    if (b->repl_tail)
        b->repl_tail->rnext = p;
    else
        b->repl_head = p;
    b->repl_tail = p;
    b->st.repl_waiting++;
    if (first) {
        repl_arm(b);
        repl_kick(b);
    }
}

/* A record committed here, delivered once MySQL holds it. Its frame is
 * kept while the held frames fit a quarter of tail_cache_bytes; beyond,
 * subscribers read it from the WAL when it is released. */
struct held {
    struct held *next;
    brk_stream_t *s;
    uint64_t offset, seq;
    brk_frame_t *f; /* NULL: read from the WAL */
};

/* The stream's committed state moves to off (with its frame, if any). */
static void stream_commit(brk_t *b, brk_stream_t *s, uint64_t off, brk_frame_t *f)
{
    if (f) {
        cache_put(b, s, off, f);
    } else if (off >= s->next) {
        s->next = off + 1;
        cache_clear(b, s);
    }
}

static void held_push(brk_t *b, brk_stream_t *s, uint64_t off, uint64_t seq, brk_frame_t *f)
{
    struct held *h = malloc(sizeof(*h));
    if (!h) { /* cannot hold it back: deliver now rather than never */
        stream_commit(b, s, off, f);
        wake_stream(s);
        return;
    }
    *h = (struct held){.s = s, .offset = off, .seq = seq};
    if (f && b->held_bytes + f->len <= b->o.tail_cache_bytes / 4) {
        brk_frame_ref(f);
        h->f = f;
        b->held_bytes += f->len;
    }
    s->held++;
    b->st.repl_held++;
    bool first = !b->held_head;
    if (b->held_tail)
        b->held_tail->next = h;
    else
        b->held_head = h;
    b->held_tail = h;
    if (first)
        repl_kick(b);
}

/* Deliver what MySQL now holds. */
static void held_release(brk_t *b)
{
    while (b->held_head && b->held_head->seq <= b->repl_wm) {
        struct held *h = b->held_head;
        b->held_head = h->next;
        if (!b->held_head)
            b->held_tail = NULL;
        stream_commit(b, h->s, h->offset, h->f);
        h->s->held--;
        b->st.repl_held--;
        if (h->f) {
            b->held_bytes -= h->f->len;
            brk_frame_unref(h->f);
        }
        /* wake once per run of one stream's records */
        if (!b->held_head || b->held_head->s != h->s || b->held_head->seq > b->repl_wm)
            wake_stream(h->s);
        free(h);
    }
}

/* Runs on the loop after the commit that holds the publish returned. */
static void pub_done(wal_append_t *req, void *arg)
{
    struct pub_ctx *p = arg;
    brk_t *b = p->b;
    int status = wal_append_status(req);
    const wal_result_t *r = status == 0 ? wal_append_result(req, 0) : NULL;
    if (status == 0 && !r)
        status = WAL_EINVAL;
    bool woke = false;
    if (r) {
        pub_times(b, p, req);
        p->offset = r->offset;
        p->duplicate = r->duplicate;
        if (r->duplicate) {
            b->st.publish_dups++;
        } else {
            b->st.publishes++;
            woke = true;
            brk_stream_t *s = stream_get(b, p->stream, p->stream_len);
            if (s) {
                if (s->epoch == 0)
                    stream_born(s, r->epoch);
                s->epoch = r->epoch;
                /* Encode once: every subscriber at the tail shares it. */
                const uint8_t *hdr = NULL, *pay = NULL;
                size_t hdr_len = 0, pay_len = 0;
                wal_append_msg_data(req, 0, &hdr, &hdr_len, &pay, &pay_len);
                brk_frame_t *f = frame_msg(p->stream, p->stream_len, r->offset, p->ts, hdr, hdr_len,
                                           pay, pay_len);
                if (b->o.ack == BRK_ACK_REPLICATED && (r->seq > b->repl_wm || b->held_head)) {
                    held_push(b, s, r->offset, r->seq, f);
                    woke = false; /* delivered by held_release */
                } else {
                    stream_commit(b, s, r->offset, f);
                }
                if (f)
                    brk_frame_unref(f);
            }
        }
    } else {
        b->st.publish_errors++;
    }
    /* A duplicate's record is older than everything acknowledged now: it
     * is in MySQL once the watermark reaches the last of those. */
    uint64_t target = !r ? 0 : r->duplicate ? wal_acked_next_seq(b->wal) - 1 : r->seq;
    /* found before the answer frees p (a stream with an epoch stays) */
    brk_stream_t *ws = woke ? stream_find(b, p->stream, p->stream_len) : NULL;
    if (r && p->ack == BRK_ACK_REPLICATED && target > b->repl_wm) {
        repl_wait(b, p, target);
    } else {
        if (r && p->ack == BRK_ACK_REPLICATED)
            repl_count_acked(b, p, mono_us());
        pub_answer(b, p, status);
    }
    wal_append_free(req);
    if (ws)
        wake_stream(ws);
}

static int publish_common(brk_t *b, brk_client_t *c, uint64_t id, const char *stream,
                          size_t stream_len, const uint8_t *payload, size_t payload_len,
                          const char *producer, const uint8_t *msgid, size_t msgid_len,
                          const uint8_t *headers, size_t headers_len, enum wal_direction dir,
                          int ack, brk_api_cb cb, void *arg)
{
    if (ack == BRK_ACK_DEFAULT)
        ack = b->o.ack;
    if (ack == BRK_ACK_REPLICATED) {
        /* never a silent downgrade: refused before anything is stored */
        if (!repl_up(b)) {
            b->st.repl_refused++;
            return b->repl_known ? BRK_EREPL_DOWN : BRK_EREPL_NONE;
        }
    }
    struct pub_ctx *p = calloc(1, sizeof(*p) + stream_len);
    if (!p)
        return WAL_ENOMEM;
    p->ack = ack;
    p->b = b;
    p->c = c;
    p->id = id;
    p->ts = now_us();
    p->t0_mono = mono_us();
    p->api_cb = cb;
    p->api_arg = arg;
    memcpy(p->stream, stream, stream_len);
    p->stream_len = stream_len;
    wal_append_t *req;
    int rc = wal_append_new(pub_done, p, &req);
    if (rc) {
        free(p);
        return rc;
    }
    /* puback, and live delivery from the tail cache, at the durable point */
    wal_append_when_durable(req);
    wal_msg_t m = {
        .stream = stream,
        .stream_len = stream_len,
        .payload = payload,
        .payload_len = payload_len,
        .producer = producer,
        .producer_len = producer ? strlen(producer) : 0,
        .msgid = msgid,
        .msgid_len = msgid_len,
        .headers = headers,
        .headers_len = headers_len,
        .direction = dir,
        .timestamp_us = p->ts,
    };
    if (m.producer_len > WAL_PRODUCER_MAX)
        m.producer_len = WAL_PRODUCER_MAX;
    rc = wal_append_reserve(req, 1,
                            stream_len + m.producer_len + msgid_len + headers_len + payload_len);
    if (!rc)
        rc = wal_append_add_msg(req, &m);
    if (!rc)
        rc = wal_append_submit(b->wal, req);
    if (rc) {
        wal_append_free(req);
        free(p);
        return rc;
    }
    if (c) {
        c->refs++;
        c->pending_pubs++;
    }
    return 0;
}

void brk_publish(brk_client_t *c, uint64_t id, const uint8_t *stream, size_t stream_len,
                 const uint8_t *payload, size_t payload_len, const uint8_t *msgid, size_t msgid_len,
                 const uint8_t *headers_raw, size_t headers_len, int ack)
{
    brk_t *b = c->b;
    const char *name = (const char *)stream;
    if (!brk_stream_name_valid(name, stream_len)) {
        send_nack(c, id, PROTO_CODE_BAD_REQUEST, "invalid stream name");
        return;
    }
    if (payload_len > b->o.max_payload) {
        send_nack(c, id, PROTO_CODE_TOO_LARGE, "payload too large");
        return;
    }
    if (msgid_len > WAL_MSGID_MAX || headers_len > WAL_HEADERS_MAX) {
        send_nack(c, id, PROTO_CODE_BAD_REQUEST, "msgid or headers too long");
        return;
    }
    if (!c->pub_all && !proto_pattern_match(c->pub, c->n_pub, name, stream_len)) {
        send_nack(c, id, PROTO_CODE_FORBIDDEN, "publish not allowed");
        return;
    }
    int rc = publish_common(b, c, id, name, stream_len, payload, payload_len, c->producer, msgid,
                            msgid_len, headers_raw, headers_len, WAL_DIR_IN, ack, NULL, NULL);
    if (rc) {
        b->st.publish_errors++;
        send_nack(c, id, wal_code(rc), wal_reason(rc));
    }
}

int brk_publish_api(brk_t *b, const char *producer, const char *stream, size_t stream_len,
                    const uint8_t *payload, size_t payload_len, const uint8_t *msgid,
                    size_t msgid_len, const uint8_t *headers_raw, size_t headers_len, int ack,
                    brk_api_cb cb, void *arg)
{
    if (!brk_stream_name_valid(stream, stream_len) || payload_len > b->o.max_payload ||
        msgid_len > WAL_MSGID_MAX || headers_len > WAL_HEADERS_MAX)
        return WAL_EINVAL;
    return publish_common(b, NULL, 0, stream, stream_len, payload, payload_len, producer, msgid,
                          msgid_len, headers_raw, headers_len, WAL_DIR_OUT, ack, cb, arg);
}

/* ---- subscribe / ack --------------------------------------------------- */

void brk_subscribe(brk_client_t *c, uint64_t id, const uint8_t *stream, size_t stream_len, int from,
                   uint64_t offset, uint64_t epoch)
{
    brk_t *b = c->b;
    const char *name = (const char *)stream;
    if (!brk_stream_name_valid(name, stream_len)) {
        send_nack(c, id, PROTO_CODE_BAD_REQUEST, "invalid stream name");
        return;
    }
    if (!c->subs_all && !proto_pattern_match(c->subs, c->n_subs, name, stream_len)) {
        send_nack(c, id, PROTO_CODE_FORBIDDEN, "subscribe not allowed");
        return;
    }
    brk_stream_t *s = stream_get(b, name, stream_len);
    if (!s) {
        send_nack(c, id, PROTO_CODE_INTERNAL, "out of memory");
        return;
    }
    s->used_s = mono_s();
    if (sub_find(c, s)) {
        send_nack(c, id, PROTO_CODE_CONFLICT, "already subscribed");
        return;
    }
    if (c->n_sub >= b->o.max_subscriptions) {
        send_nack(c, id, PROTO_CODE_LIMIT, "too many subscriptions");
        return;
    }
    if (epoch && epoch != s->epoch) {
        /* Another epoch, or none: the stream the client's offsets belong
         * to is gone (a stream that does not exist has epoch 0). */
        send_nack(c, id, PROTO_CODE_CONFLICT, "epoch mismatch");
        return;
    }
    /* An offset beyond the tail waits for it: delivery starts there. */
    uint64_t start = from == PROTO_FROM_EARLIEST ? s->first
                     : from == PROTO_FROM_LATEST ? s->next
                                                 : (offset ? offset : 1);
    brk_sub_t *sub = sub_add(c, s, start, start - 1);
    if (!sub) {
        send_nack(c, id, PROTO_CODE_INTERNAL, "out of memory");
        return;
    }
    if (c->durable)
        mark_dirty(c); /* the session records the subscription (acked = start - 1) */
    proto_buf_t pb = {0};
    if (proto_enc_subok(&pb, id, stream, stream_len, s->epoch, s->first, s->next) == 0)
        send_buf(c, &pb);
    proto_buf_free(&pb);
    deliver_sub(sub, DELIVER_BUDGET);
}

void brk_unsubscribe(brk_client_t *c, uint64_t id, const uint8_t *stream, size_t stream_len)
{
    brk_stream_t *s = stream_find(c->b, (const char *)stream, stream_len);
    brk_sub_t **pp = &c->sub_list;
    while (s && *pp && (*pp)->stream != s)
        pp = &(*pp)->next_in_client;
    if (!s || !*pp) {
        send_nack(c, id, PROTO_CODE_NOT_FOUND, "not subscribed");
        return;
    }
    brk_sub_t *sub = *pp;
    *pp = sub->next_in_client;
    sub_unlink(sub);
    if (c->durable) {
        /* The session no longer has this subscription. */
        wal_append_t *req;
        if (wal_append_new(cursor_done, c->b, &req) == 0)
            cursor_submit(c->b, req,
                          wal_append_del_cursor(req, c->session, strlen(c->session), s->name,
                                                s->name_len) == 0);
    }
    sub_free(sub);
    stream_release(c->b, s);
    c->n_sub--;
    c->b->st.subscriptions--;
    proto_buf_t pb = {0};
    if (proto_enc_unsubok(&pb, id, stream, stream_len) == 0)
        send_buf(c, &pb);
    proto_buf_free(&pb);
}

void brk_ack(brk_client_t *c, const uint8_t *stream, size_t stream_len, uint64_t offset)
{
    brk_stream_t *s = stream_find(c->b, (const char *)stream, stream_len);
    brk_sub_t *sub = s ? sub_find(c, s) : NULL;
    if (!sub) {
        send_error(c, 0, PROTO_CODE_NOT_FOUND, "ack for a stream not subscribed");
        return;
    }
    if (offset >= sub->next) {
        send_error(c, 0, PROTO_CODE_CONFLICT, "ack beyond delivered");
        return;
    }
    c->b->st.acks++;
    if (offset > sub->acked) {
        sub->acked = offset;
        mark_dirty(c);
        deliver_sub(sub, DELIVER_BUDGET);
    }
}

/* ---- lifecycle --------------------------------------------------------- */

static int index_session_cb(const char *id, size_t len, const wal_session_t *ws, void *arg)
{
    brk_t *b = arg;
    char sid[WAL_SESSION_MAX + 1], owner[WAL_PRODUCER_MAX + 1];
    if (len > WAL_SESSION_MAX || ws->owner_len == 0)
        return 0;
    memcpy(sid, id, len);
    sid[len] = 0;
    memcpy(owner, ws->owner, ws->owner_len);
    owner[ws->owner_len] = 0;
    (void)brk_owners_add(b->owners, owner, 0, sid);
    return 0;
}

int brk_new(struct event_base *base, wal_t *wal, const brk_options_t *opts, brk_t **ret)
{
    brk_t *b = calloc(1, sizeof(*b));
    if (!b)
        return -1;
    b->base = base;
    b->wal = wal;
    b->o = *opts;
    if (wal)
        wal_on_visible(wal, brk_visible, b);
    if (!b->o.max_payload)
        b->o.max_payload = 1u << 20;
    if (!b->o.max_subscriptions)
        b->o.max_subscriptions = 256;
    if (!b->o.max_inflight)
        b->o.max_inflight = 1024;
    if (!b->o.out_high_watermark)
        b->o.out_high_watermark = 4u << 20;
    if (!b->o.tail_cache_msgs)
        b->o.tail_cache_msgs = 1024;
    if (!b->o.session_ttl_s)
        b->o.session_ttl_s = 86400;
    if (!b->o.expire_interval_ms)
        b->o.expire_interval_ms = 60000;
    if (!b->o.tail_cache_bytes)
        b->o.tail_cache_bytes = 64ull << 20;
    if (!b->o.stream_idle_s)
        b->o.stream_idle_s = 60;
    if (!b->o.ack_timeout_ms)
        b->o.ack_timeout_ms = 5000;
    if (b->o.ack != BRK_ACK_REPLICATED)
        b->o.ack = BRK_ACK_LOCAL;
    b->n_buckets = 4096;
    b->buckets = calloc(b->n_buckets, sizeof(*b->buckets));
    b->n_sess_buckets = 4096;
    b->sess = calloc(b->n_sess_buckets, sizeof(*b->sess));
    b->flush_ev = event_new(base, -1, EV_PERSIST, flush_cb, b);
    b->expire_ev = event_new(base, -1, EV_PERSIST, expire_ev_cb, b);
    b->evict_ev = event_new(base, -1, EV_PERSIST, evict_ev_cb, b);
    b->repl_ev = evtimer_new(base, repl_ev_cb, b);
    if (rpl_new(wal, &b->rpl) != 0)
        b->rpl = NULL;
    if (!b->buckets || !b->sess || !b->flush_ev || !b->expire_ev || !b->evict_ev || !b->rpl ||
        !b->repl_ev) {
        rpl_free(b->rpl);
        free(b->buckets);
        free(b->sess);
        if (b->flush_ev)
            event_free(b->flush_ev);
        if (b->expire_ev)
            event_free(b->expire_ev);
        if (b->evict_ev)
            event_free(b->evict_ev);
        if (b->repl_ev)
            event_free(b->repl_ev);
        free(b);
        return -1;
    }
    brk_owners_limits_t ol = {.per_owner = b->o.max_sessions_per_owner,
                              .per_addr = b->o.max_sessions_per_addr,
                              .rate = b->o.session_rate,
                              .burst = b->o.session_burst};
    if (brk_owners_new(&ol, &b->owners) != 0) {
        brk_free(b);
        return -1;
    }
    /* the owners of the sessions the WAL holds (token subjects; an
     * anonymous session's address is not recorded) */
    if (wal)
        (void)wal_session_list(wal, index_session_cb, b);
    struct timeval vtv = {5, 0};
    event_add(b->evict_ev, &vtv);
    struct timeval tv = {0, 100000}; /* cursors are batched: at most one commit per 100 ms */
    event_add(b->flush_ev, &tv);
    struct timeval etv = {(time_t)(b->o.expire_interval_ms / 1000),
                          (suseconds_t)(b->o.expire_interval_ms % 1000) * 1000};
    event_add(b->expire_ev, &etv);
    *ret = b;
    return 0;
}

void brk_free(brk_t *b)
{
    if (!b)
        return;
    /* The WAL's visible callback points here: callers close the WAL first
     * (its completions may still need the broker). */
    proto_buf_free(&b->reply);
    event_free(b->flush_ev);
    event_free(b->expire_ev);
    event_free(b->evict_ev);
    while (b->held_head) {
        struct held *h = b->held_head;
        b->held_head = h->next;
        if (h->f)
            brk_frame_unref(h->f);
        free(h);
    }
    /* replicated publishes still waiting: their clients are gone */
    while (b->repl_head) {
        struct pub_ctx *p = b->repl_head;
        b->repl_head = p->rnext;
        if (p->c)
            client_unref(p->c);
        free(p);
    }
    event_free(b->repl_ev);
    brk_owners_free(b->owners);
    while (b->handoff_head) {
        struct handoff *h = b->handoff_head;
        h->pending = false; /* the WAL, closed first, completed its write */
        handoff_release(b, h);
    }
    free(b->sess);
    rpl_free(b->rpl);
    while (b->dirty) {
        brk_client_t *c = b->dirty;
        b->dirty = c->next_dirty;
        client_unref(c);
    }
    for (size_t i = 0; i < b->n_buckets; i++) {
        brk_stream_t *s = b->buckets[i];
        while (s) {
            brk_stream_t *next = s->hnext;
            cache_clear(b, s);
            free(s->name);
            free(s);
            s = next;
        }
    }
    free(b->buckets);
    free(b);
}

void brk_set_cold(brk_t *b, struct sync_cold *cold)
{
    rpl_set_cold(b->rpl, cold, b->base);
}

void brk_stats_get(const brk_t *b, brk_stats_t *ret)
{
    *ret = b->st;
    ret->cache_bytes = b->cache_bytes;
    rpl_stats_t rs;
    rpl_stats_get(b->rpl, &rs);
    ret->cold_reads = rs.cold_reads;
    ret->cold_records = rs.cold_records;
    ret->cold_errors = rs.cold_errors;
}

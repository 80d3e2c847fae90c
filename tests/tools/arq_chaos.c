/*
 * arq-chaos - libarq publishers and subscribers that check, at the
 * application, that every acknowledged publish arrives exactly once and in
 * order, through whatever happens to the connections and the broker
 * meanwhile (integration tests kill and restart arqd, cut connections...).
 *
 *   arq-chaos --url URL [--streams N=4] [--publishers P=4] [--subscribers S=2]
 *             [--sub-streams K=0] [--messages M=500] [--depth W=8] [--pub-rate R=0]
 *             [--timeout SEC=120] [--run-id ID] [--hb-interval-ms 200]
 *             [--hb-timeout-ms 600] [--backoff-base-ms 10] [--backoff-cap-ms 300]
 *             [--ack-every A=1]
 *
 * One libevent loop, P + S libarq clients with reconnection. Streams are
 * chaos.<run-id>.<k>, k < N. Publisher p sends M messages, message j to
 * stream (p + j) % N with payload "<run-id>:<p>:<j>" and msgid
 * "<run-id>-<p>-<j>", at most W in flight (at R msgs/s if R > 0).
 * Subscriber s subscribes from offset 1 to every stream (or with K > 0 to
 * streams s % N .. (s + K - 1) % N) and acks every A messages. Publishing
 * starts once every client is welcomed and every subscription confirmed
 * ("arq-chaos: ready" on stderr).
 *
 * Done when every publish is acked and every subscriber has, for each of
 * its streams, every offset up to the highest acked offset. Checks: each
 * subscriber sees offsets 1, 2, 3... of each stream once, in order, with no
 * gap and no epoch change; the payload at each acked (stream, offset) is the
 * published one; no payload sits at two offsets (a duplicate append); every
 * delivered payload is an acked publish's.
 *
 * stdout: one JSON line of counters: acked, delivered, publishers,
 * subscribers, reconnects (successful reconnections: welcomes after each
 * client's first, over all clients), redeliveries_dropped (messages libarq
 * dropped as already delivered), dup_pubacks, violations, seconds, and
 * reconnect_attempts (attempts started: one per connection lost or attempt
 * failed, including those cut or refused before their welcome).
 * Exit: 0 all good, 1 violations (the
 * first 20 on stderr), 2 timeout (what is missing on stderr), 3 usage or
 * setup error (including: not ready within the timeout).
 */
#include <errno.h>
#include <event2/event.h>
#include <getopt.h>
#include <inttypes.h>
#include <jansson.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "arq.h"

#define MAX_REPORTED 20
#define TICK_MS      10

enum { PUB_NONE = 0, PUB_SENT, PUB_ACKED, PUB_FAILED };

struct chaos;

/* One publish: the callback argument of arq_publish(). */
struct pubrec {
    struct chaos *ch;
    uint32_t p, j;
    uint64_t offset;
    uint8_t state;
};

struct pubc {
    struct chaos *ch;
    arq_client_t *c;
    uint32_t idx;
    uint32_t next_j, inflight;
    double credit; /* --pub-rate */
    int welcomed;
};

/* One subscriber's view of one stream: the msg callback argument. */
struct subview {
    struct subc *owner;
    uint32_t k;
    uint64_t next;  /* next offset expected */
    uint64_t count; /* delivered */
    int subok;
};

struct subc {
    struct chaos *ch;
    arq_client_t *c;
    uint32_t idx;
    uint32_t nviews;
    struct subview *views;
    int welcomed;
};

/* What was delivered at each offset of a stream (payload index + 1). */
struct streamtab {
    char name[160];
    uint32_t *at;
    uint64_t cap; /* entries in at[] (offset 0 unused) */
    uint64_t max_acked;
};

struct chaos {
    struct event_base *base;
    const char *url;
    char run_id[101];
    uint32_t n, p, s, k, m, w, a;
    double rate;
    uint32_t timeout_s;
    uint32_t hb_interval, hb_timeout, backoff_base, backoff_cap;

    struct pubc *pubs;
    struct subc *subs;
    struct pubrec *recs; /* p * m + j */
    struct streamtab *tabs;
    uint64_t max_offset; /* bound on offsets we store */

    uint64_t welcomed, subs_ok, subs_total;
    int ready;
    uint64_t acked, failed_pubs, delivered, dup_pubacks;
    uint64_t attempts; /* reconnection attempts started, all clients */
    uint64_t violations;
    int setup_error;
    int finished; /* exit code chosen */
    struct timespec t0, t_ready;
    uint64_t last_progress_ms;
    struct event *ev_tick, *ev_sigint;
};

static uint64_t ms_since(const struct timespec *t0)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)(t.tv_sec - t0->tv_sec) * 1000u +
           (uint64_t)((t.tv_nsec - t0->tv_nsec) / 1000000);
}

static void violation(struct chaos *ch, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void violation(struct chaos *ch, const char *fmt, ...)
{
    if (ch->violations++ < MAX_REPORTED) {
        va_list ap;
        va_start(ap, fmt);
        fputs("arq-chaos: violation: ", stderr);
        vfprintf(stderr, fmt, ap);
        fputc('\n', stderr);
        va_end(ap);
    }
}

static void finish(struct chaos *ch, int code)
{
    if (ch->finished)
        return;
    ch->finished = code + 1;
    event_base_loopbreak(ch->base);
}

/* Make at[] hold offset; 0 or -1 (beyond any plausible offset). */
static int tab_reserve(struct chaos *ch, struct streamtab *t, uint64_t offset)
{
    if (offset < t->cap)
        return 0;
    if (offset > ch->max_offset)
        return -1;
    uint64_t cap = t->cap ? t->cap : 64;
    while (cap <= offset)
        cap *= 2;
    uint32_t *at = realloc(t->at, cap * sizeof(*at));
    if (!at) {
        fprintf(stderr, "arq-chaos: out of memory\n");
        exit(3);
    }
    memset(at + t->cap, 0, (cap - t->cap) * sizeof(*at));
    t->at = at;
    t->cap = cap;
    return 0;
}

/* "<run-id>:<p>:<j>" -> p * M + j, or -1. */
static int64_t parse_payload(const struct chaos *ch, const uint8_t *pl, size_t len)
{
    size_t rl = strlen(ch->run_id);
    char buf[160];
    if (len <= rl + 1 || len >= sizeof(buf) || memcmp(pl, ch->run_id, rl) != 0 || pl[rl] != ':')
        return -1;
    memcpy(buf, pl + rl + 1, len - rl - 1);
    buf[len - rl - 1] = '\0';
    char *e;
    errno = 0;
    unsigned long p = strtoul(buf, &e, 10);
    if (errno || e == buf || *e != ':')
        return -1;
    char *f = e + 1;
    unsigned long j = strtoul(f, &e, 10);
    if (errno || e == f || *e || p >= ch->p || j >= ch->m)
        return -1;
    return (int64_t)p * ch->m + (int64_t)j;
}

/* ---- publishers ------------------------------------------------------------ */

static void pub_pump(struct pubc *pc);

static void on_puback(arq_client_t *c, int status, uint64_t offset, int dup, void *arg)
{
    struct pubrec *r = arg;
    struct chaos *ch = r->ch;
    struct pubc *pc = &ch->pubs[r->p];
    pc->inflight--;
    if (status != 0) {
        r->state = PUB_FAILED;
        ch->failed_pubs++;
        violation(ch, "publish %u:%u failed: %s (%s)", r->p, r->j, arq_strerror(status),
                  arq_client_last_error(c));
    } else {
        r->state = PUB_ACKED;
        r->offset = offset;
        ch->acked++;
        if (dup)
            ch->dup_pubacks++;
        struct streamtab *t = &ch->tabs[(r->p + r->j) % ch->n];
        if (offset > t->max_acked)
            t->max_acked = offset;
    }
    if (!ch->finished)
        pub_pump(pc);
}

static void pub_one(struct pubc *pc)
{
    struct chaos *ch = pc->ch;
    uint32_t j = pc->next_j;
    struct pubrec *r = &ch->recs[(size_t)pc->idx * ch->m + j];
    char payload[160], msgid[160];
    snprintf(payload, sizeof(payload), "%s:%u:%u", ch->run_id, pc->idx, j);
    snprintf(msgid, sizeof(msgid), "%s-%u-%u", ch->run_id, pc->idx, j);
    r->ch = ch;
    r->p = pc->idx;
    r->j = j;
    int rc = arq_publish(pc->c, ch->tabs[(pc->idx + j) % ch->n].name, payload, strlen(payload),
                         msgid, on_puback, r);
    pc->next_j++;
    if (rc != 0) {
        r->state = PUB_FAILED;
        ch->failed_pubs++;
        violation(ch, "publish %u:%u refused: %s", pc->idx, j, arq_strerror(rc));
        return;
    }
    r->state = PUB_SENT;
    pc->inflight++;
}

static void pub_pump(struct pubc *pc)
{
    struct chaos *ch = pc->ch;
    if (!ch->ready)
        return;
    while (pc->next_j < ch->m && pc->inflight < ch->w && (ch->rate <= 0 || pc->credit >= 1)) {
        if (ch->rate > 0)
            pc->credit -= 1;
        pub_one(pc);
    }
}

/* ---- subscribers ------------------------------------------------------------ */

static void on_msg(arq_client_t *c, const arq_message_t *m, void *arg)
{
    struct subview *v = arg;
    struct subc *sc = v->owner;
    struct chaos *ch = sc->ch;
    ch->delivered++;
    v->count++;
    if (m->offset != v->next)
        violation(ch, "subscriber %u stream %u: offset %" PRIu64 " delivered, expected %" PRIu64,
                  sc->idx, v->k, m->offset, v->next);
    if (m->offset >= v->next)
        v->next = m->offset + 1;
    int64_t idx = parse_payload(ch, m->payload, m->payload_len);
    struct streamtab *t = &ch->tabs[v->k];
    if (idx < 0) {
        violation(ch, "stream %u offset %" PRIu64 ": payload '%.*s' is not one of ours", v->k,
                  m->offset, (int)(m->payload_len < 80 ? m->payload_len : 80),
                  (const char *)m->payload);
    } else if (tab_reserve(ch, t, m->offset) != 0) {
        violation(ch, "stream %u: offset %" PRIu64 " beyond anything published", v->k, m->offset);
    } else if (t->at[m->offset] == 0) {
        t->at[m->offset] = (uint32_t)idx + 1;
    } else if (t->at[m->offset] != (uint32_t)idx + 1) {
        uint32_t o = t->at[m->offset] - 1;
        violation(ch,
                  "stream %u offset %" PRIu64 ": subscriber %u got %" PRId64 ":%" PRId64
                  ", another got %u:%u",
                  v->k, m->offset, sc->idx, idx / ch->m, idx % ch->m, o / ch->m, o % ch->m);
    }
    if (v->count % ch->a == 0) {
        int rc = arq_ack(c, m->stream, m->offset);
        if (rc != 0)
            violation(ch, "subscriber %u: ack %" PRIu64 " refused: %s", sc->idx, m->offset,
                      arq_strerror(rc));
    }
}

static void on_gap(arq_client_t *c, const char *stream, uint64_t from, uint64_t to, void *arg)
{
    struct subc *sc = arg;
    violation(sc->ch, "subscriber %u: gap %" PRIu64 "..%" PRIu64 " in '%s'", sc->idx, from, to,
              stream);
}

static void on_epoch(arq_client_t *c, const char *stream, uint64_t old, uint64_t new_epoch,
                     void *arg)
{
    struct subc *sc = arg;
    violation(sc->ch, "subscriber %u: epoch of '%s' changed %" PRIu64 " -> %" PRIu64, sc->idx,
              stream, old, new_epoch);
}

static void check_ready(struct chaos *ch);

static void on_subok(arq_client_t *c, int status, uint64_t epoch, uint64_t first, uint64_t next,
                     void *arg)
{
    struct subview *v = arg;
    struct chaos *ch = v->owner->ch;
    if (status != 0) {
        fprintf(stderr, "arq-chaos: subscriber %u: subscribe to stream %u failed: %s (%s)\n",
                v->owner->idx, v->k, arq_strerror(status), arq_client_last_error(c));
        if (!ch->ready) {
            ch->setup_error = 1;
            finish(ch, 3);
        } else {
            violation(ch, "subscriber %u lost its subscription to stream %u", v->owner->idx, v->k);
            finish(ch, 1);
        }
        return;
    }
    if (!v->subok) {
        v->subok = 1;
        ch->subs_ok++;
        check_ready(ch);
    }
}

/* ---- clients ----------------------------------------------------------------- */

static void on_connect_pub(arq_client_t *c, int status, void *arg)
{
    struct pubc *pc = arg;
    struct chaos *ch = pc->ch;
    if (status != 0) {
        fprintf(stderr, "arq-chaos: publisher %u: %s\n", pc->idx, arq_client_last_error(c));
        ch->setup_error = 1;
        finish(ch, 3);
        return;
    }
    pc->welcomed = 1;
    ch->welcomed++;
    check_ready(ch);
}

static void on_connect_sub(arq_client_t *c, int status, void *arg)
{
    struct subc *sc = arg;
    struct chaos *ch = sc->ch;
    if (status != 0) {
        fprintf(stderr, "arq-chaos: subscriber %u: %s\n", sc->idx, arq_client_last_error(c));
        ch->setup_error = 1;
        finish(ch, 3);
        return;
    }
    sc->welcomed = 1;
    ch->welcomed++;
    for (uint32_t i = 0; i < sc->nviews; i++) {
        struct subview *v = &sc->views[i];
        int rc = arq_subscribe(c, ch->tabs[v->k].name, ARQ_FROM_OFFSET, 1, ARQ_EPOCH_ANY, on_subok,
                               on_msg, v);
        if (rc != 0) {
            fprintf(stderr, "arq-chaos: subscriber %u: subscribe: %s\n", sc->idx, arq_strerror(rc));
            ch->setup_error = 1;
            finish(ch, 3);
            return;
        }
    }
    check_ready(ch);
}

/* Count reconnection attempts; a client that gives up cannot finish: end the run. */
static void on_state(arq_client_t *c, arq_state_t old, arq_state_t new_state, int status,
                     const char *reason, void *arg)
{
    struct chaos *ch = arg;
    if (new_state == ARQ_STATE_RECONNECTING)
        ch->attempts++;
    if (new_state != ARQ_STATE_FAILED && new_state != ARQ_STATE_CLOSED)
        return;
    if (ch->finished)
        return;
    if (!ch->ready) {
        fprintf(stderr, "arq-chaos: a client failed during setup: %s\n", reason);
        ch->setup_error = 1;
        finish(ch, 3);
        return;
    }
    violation(ch, "a client ended (%s): %s", arq_state_name(new_state), reason);
    finish(ch, 1);
}

static void check_ready(struct chaos *ch)
{
    if (ch->ready || ch->welcomed < (uint64_t)ch->p + ch->s || ch->subs_ok < ch->subs_total)
        return;
    ch->ready = 1;
    clock_gettime(CLOCK_MONOTONIC, &ch->t_ready);
    fprintf(stderr, "arq-chaos: ready\n");
    fflush(stderr);
    for (uint32_t i = 0; i < ch->p; i++)
        pub_pump(&ch->pubs[i]);
}

/* ---- progress, completion, verification ---------------------------------- */

struct totals {
    uint64_t reconnects; /* welcomes after a client's first */
    uint64_t dropped;    /* redeliveries libarq dropped */
    uint64_t connected;  /* clients connected now */
};

static struct totals totals(const struct chaos *ch)
{
    struct totals t = {0};
    arq_client_stats_t st;
    for (uint32_t i = 0; i < ch->p + ch->s; i++) {
        arq_client_t *c = i < ch->p ? ch->pubs[i].c : ch->subs[i - ch->p].c;
        arq_client_stats(c, &st);
        t.reconnects += st.reconnects;
        t.dropped += st.redeliveries_dropped;
        t.connected += arq_client_state(c) == ARQ_STATE_CONNECTED;
    }
    return t;
}

static int all_done(const struct chaos *ch)
{
    if (ch->acked + ch->failed_pubs < (uint64_t)ch->p * ch->m)
        return 0;
    for (uint32_t i = 0; i < ch->s; i++) {
        const struct subc *sc = &ch->subs[i];
        for (uint32_t v = 0; v < sc->nviews; v++)
            if (sc->views[v].next <= ch->tabs[sc->views[v].k].max_acked)
                return 0;
    }
    return 1;
}

static void report_missing(const struct chaos *ch)
{
    uint64_t total = (uint64_t)ch->p * ch->m, shown = 0;
    fprintf(stderr,
            "arq-chaos: timeout: %" PRIu64 " of %" PRIu64 " publishes acked, %" PRIu64 " failed\n",
            ch->acked, total, ch->failed_pubs);
    for (uint64_t i = 0; i < total && shown < MAX_REPORTED; i++) {
        const struct pubrec *r = &ch->recs[i];
        if (r->state == PUB_ACKED || r->state == PUB_FAILED)
            continue;
        shown++;
        fprintf(stderr, "arq-chaos: missing: puback of %u:%u (%s)\n", (uint32_t)(i / ch->m),
                (uint32_t)(i % ch->m), r->state == PUB_SENT ? "sent" : "not sent yet");
    }
    shown = 0;
    for (uint32_t i = 0; i < ch->s && shown < MAX_REPORTED; i++) {
        const struct subc *sc = &ch->subs[i];
        for (uint32_t v = 0; v < sc->nviews && shown < MAX_REPORTED; v++) {
            const struct subview *sv = &sc->views[v];
            uint64_t want = ch->tabs[sv->k].max_acked;
            if (sv->next <= want) {
                shown++;
                fprintf(stderr,
                        "arq-chaos: missing: subscriber %u stream %u has offsets up to %" PRIu64
                        ", acked up to %" PRIu64 " (state %s)\n",
                        sc->idx, sv->k, sv->next - 1, want,
                        arq_state_name(arq_client_state(sc->c)));
            }
        }
    }
}

/* The end-of-run checks on the publish records and the stream tables. */
static void verify(struct chaos *ch)
{
    uint64_t total = (uint64_t)ch->p * ch->m;
    uint64_t *where = calloc(total ? total : 1, sizeof(*where)); /* offset of each payload */
    if (!where) {
        fprintf(stderr, "arq-chaos: out of memory\n");
        exit(3);
    }
    for (uint32_t k = 0; k < ch->n; k++) {
        const struct streamtab *t = &ch->tabs[k];
        for (uint64_t off = 1; off < t->cap; off++) {
            if (!t->at[off])
                continue;
            uint32_t idx = t->at[off] - 1;
            uint32_t p = idx / ch->m, j = idx % ch->m;
            const struct pubrec *r = &ch->recs[idx];
            if ((p + j) % ch->n != k)
                violation(ch, "stream %u offset %" PRIu64 ": payload %u:%u of stream %u", k, off, p,
                          j, (p + j) % ch->n);
            else if (where[idx])
                violation(ch,
                          "stream %u: payload %u:%u at offsets %" PRIu64 " and %" PRIu64
                          " (duplicate append)",
                          k, p, j, where[idx], off);
            else
                where[idx] = off;
            if (r->state != PUB_ACKED)
                violation(ch, "stream %u offset %" PRIu64 ": payload %u:%u was never acked", k, off,
                          p, j);
        }
    }
    for (uint64_t i = 0; i < total; i++) {
        const struct pubrec *r = &ch->recs[i];
        if (r->state != PUB_ACKED)
            continue;
        const struct streamtab *t = &ch->tabs[(r->p + r->j) % ch->n];
        if (r->offset >= t->cap || !t->at[r->offset])
            continue; /* no subscriber reads that stream */
        if (t->at[r->offset] != i + 1) {
            uint32_t o = t->at[r->offset] - 1;
            violation(ch,
                      "publish %u:%u acked at offset %" PRIu64 " of stream %u, which holds %u:%u",
                      r->p, r->j, r->offset, (r->p + r->j) % ch->n, o / ch->m, o % ch->m);
        }
    }
    free(where);
}

static void tick_cb(evutil_socket_t fd, short what, void *arg)
{
    struct chaos *ch = arg;
    uint64_t ms = ms_since(&ch->t0);
    if (ms >= (uint64_t)ch->timeout_s * 1000) {
        if (!ch->ready) {
            fprintf(stderr,
                    "arq-chaos: not ready after %u s: %" PRIu64 "/%u clients welcomed, "
                    "%" PRIu64 "/%" PRIu64 " subscriptions confirmed\n",
                    ch->timeout_s, ch->welcomed, ch->p + ch->s, ch->subs_ok, ch->subs_total);
            ch->setup_error = 1;
            finish(ch, 3);
        } else {
            report_missing(ch);
            finish(ch, 2);
        }
        return;
    }
    if (ms - ch->last_progress_ms >= 1000) {
        ch->last_progress_ms = ms;
        struct totals t = totals(ch);
        fprintf(stderr,
                "arq-chaos: %" PRIu64 " s: acked %" PRIu64 "/%" PRIu64 " delivered %" PRIu64
                " reconnects %" PRIu64 " (attempts %" PRIu64 ") connected %" PRIu64 "/%u%s\n",
                ms / 1000, ch->acked, (uint64_t)ch->p * ch->m, ch->delivered, t.reconnects,
                ch->attempts, t.connected, ch->p + ch->s, ch->ready ? "" : " (setting up)");
    }
    if (!ch->ready)
        return;
    if (ch->rate > 0) {
        for (uint32_t i = 0; i < ch->p; i++) {
            struct pubc *pc = &ch->pubs[i];
            pc->credit += ch->rate * TICK_MS / 1000.0;
            if (pc->credit > ch->w)
                pc->credit = ch->w;
            pub_pump(pc);
        }
    }
    if (all_done(ch))
        finish(ch, 0);
}

static void on_sigint(evutil_socket_t sig, short what, void *arg)
{
    struct chaos *ch = arg;
    report_missing(ch);
    finish(ch, 2);
}

/* ---- setup ------------------------------------------------------------------ */

static void usage(FILE *f)
{
    fprintf(f, "usage: arq-chaos --url URL [--streams N=4] [--publishers P=4] [--subscribers S=2]\n"
               "                 [--sub-streams K=0] [--messages M=500] [--depth W=8]\n"
               "                 [--pub-rate R=0] [--timeout SEC=120] [--run-id ID]\n"
               "                 [--hb-interval-ms 200] [--hb-timeout-ms 600]\n"
               "                 [--backoff-base-ms 10] [--backoff-cap-ms 300] [--ack-every A=1]\n"
               "exit: 0 ok, 1 violations, 2 timeout, 3 usage or setup error\n");
}

static int parse_u32(const char *s, uint32_t min, uint32_t max, uint32_t *out)
{
    if (!s || *s < '0' || *s > '9')
        return -1;
    char *e;
    errno = 0;
    unsigned long long v = strtoull(s, &e, 10);
    if (errno || *e || v < min || v > max)
        return -1;
    *out = (uint32_t)v;
    return 0;
}

static int valid_run_id(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n > 100)
        return 0;
    for (; *s; s++)
        if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') || (*s >= '0' && *s <= '9') ||
              *s == '_' || *s == '-'))
            return 0;
    return 1;
}

static int new_client(struct chaos *ch, const char *name, arq_client_t **ret)
{
    arq_client_options_t o = {.url = ch->url,
                              .client_name = name,
                              .reconnect = 1,
                              .backoff_base_ms = ch->backoff_base,
                              .backoff_cap_ms = ch->backoff_cap,
                              .heartbeat_interval_ms = ch->hb_interval,
                              .heartbeat_timeout_ms = ch->hb_timeout};
    int rc = arq_client_new(ch->base, &o, ret);
    if (rc != 0) {
        fprintf(stderr, "arq-chaos: cannot create a client: %s%s\n", arq_strerror(rc),
                rc == ARQ_EINVAL ? " (bad --url?)" : "");
        return -1;
    }
    arq_client_on_state(*ret, on_state, ch);
    return 0;
}

static int setup(struct chaos *ch)
{
    ch->pubs = calloc(ch->p ? ch->p : 1, sizeof(*ch->pubs));
    ch->subs = calloc(ch->s ? ch->s : 1, sizeof(*ch->subs));
    ch->recs = calloc((size_t)ch->p * ch->m + 1, sizeof(*ch->recs));
    ch->tabs = calloc(ch->n, sizeof(*ch->tabs));
    if (!ch->pubs || !ch->subs || !ch->recs || !ch->tabs)
        return -1;
    /* Offsets beyond every publish stored twice over are not ours to keep. */
    ch->max_offset = 2 * (uint64_t)ch->p * ch->m + 1024;
    for (uint32_t k = 0; k < ch->n; k++)
        snprintf(ch->tabs[k].name, sizeof(ch->tabs[k].name), "chaos.%s.%u", ch->run_id, k);
    for (uint32_t i = 0; i < ch->p; i++) {
        struct pubc *pc = &ch->pubs[i];
        pc->ch = ch;
        pc->idx = i;
        if (new_client(ch, "arq-chaos/pub", &pc->c) != 0)
            return -1;
    }
    uint32_t per = ch->k ? ch->k : ch->n;
    for (uint32_t i = 0; i < ch->s; i++) {
        struct subc *sc = &ch->subs[i];
        sc->ch = ch;
        sc->idx = i;
        sc->nviews = per;
        sc->views = calloc(per, sizeof(*sc->views));
        if (!sc->views)
            return -1;
        for (uint32_t v = 0; v < per; v++) {
            sc->views[v].owner = sc;
            sc->views[v].k = ch->k ? (i + v) % ch->n : v;
            sc->views[v].next = 1;
        }
        ch->subs_total += per;
        if (new_client(ch, "arq-chaos/sub", &sc->c) != 0)
            return -1;
        arq_client_on_gap(sc->c, on_gap, sc);
        arq_client_on_epoch(sc->c, on_epoch, sc);
    }
    for (uint32_t i = 0; i < ch->p; i++)
        if (arq_client_connect(ch->pubs[i].c, on_connect_pub, &ch->pubs[i]) != 0)
            return -1;
    for (uint32_t i = 0; i < ch->s; i++)
        if (arq_client_connect(ch->subs[i].c, on_connect_sub, &ch->subs[i]) != 0)
            return -1;
    return 0;
}

static void teardown(struct chaos *ch)
{
    for (uint32_t i = 0; ch->pubs && i < ch->p; i++)
        arq_client_free(ch->pubs[i].c);
    for (uint32_t i = 0; ch->subs && i < ch->s; i++) {
        arq_client_free(ch->subs[i].c);
        free(ch->subs[i].views);
    }
    for (uint32_t k = 0; ch->tabs && k < ch->n; k++)
        free(ch->tabs[k].at);
    free(ch->pubs);
    free(ch->subs);
    free(ch->recs);
    free(ch->tabs);
    if (ch->ev_tick)
        event_free(ch->ev_tick);
    if (ch->ev_sigint)
        event_free(ch->ev_sigint);
    if (ch->base)
        event_base_free(ch->base);
}

int main(int argc, char **argv)
{
    enum {
        O_URL = 256,
        O_STREAMS,
        O_PUBS,
        O_SUBS,
        O_SUBSTREAMS,
        O_MSGS,
        O_DEPTH,
        O_RATE,
        O_TIMEOUT,
        O_RUNID,
        O_HBI,
        O_HBT,
        O_BB,
        O_BC,
        O_ACK,
    };
    static const struct option longopts[] = {
        {"url", required_argument, NULL, O_URL},
        {"streams", required_argument, NULL, O_STREAMS},
        {"publishers", required_argument, NULL, O_PUBS},
        {"subscribers", required_argument, NULL, O_SUBS},
        {"sub-streams", required_argument, NULL, O_SUBSTREAMS},
        {"messages", required_argument, NULL, O_MSGS},
        {"depth", required_argument, NULL, O_DEPTH},
        {"pub-rate", required_argument, NULL, O_RATE},
        {"timeout", required_argument, NULL, O_TIMEOUT},
        {"run-id", required_argument, NULL, O_RUNID},
        {"hb-interval-ms", required_argument, NULL, O_HBI},
        {"hb-timeout-ms", required_argument, NULL, O_HBT},
        {"backoff-base-ms", required_argument, NULL, O_BB},
        {"backoff-cap-ms", required_argument, NULL, O_BC},
        {"ack-every", required_argument, NULL, O_ACK},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    struct chaos ch = {.n = 4,
                       .p = 4,
                       .s = 2,
                       .m = 500,
                       .w = 8,
                       .a = 1,
                       .timeout_s = 120,
                       .hb_interval = 200,
                       .hb_timeout = 600,
                       .backoff_base = 10,
                       .backoff_cap = 300};
    int opt, bad = 0;
    uint32_t rate = 0;
    while ((opt = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
        switch (opt) {
        case O_URL:
            ch.url = optarg;
            break;
        case O_STREAMS:
            bad |= parse_u32(optarg, 1, 100000, &ch.n);
            break;
        case O_PUBS:
            bad |= parse_u32(optarg, 0, 100000, &ch.p);
            break;
        case O_SUBS:
            bad |= parse_u32(optarg, 0, 100000, &ch.s);
            break;
        case O_SUBSTREAMS:
            bad |= parse_u32(optarg, 0, 100000, &ch.k);
            break;
        case O_MSGS:
            bad |= parse_u32(optarg, 0, 10000000, &ch.m);
            break;
        case O_DEPTH:
            bad |= parse_u32(optarg, 1, 10000, &ch.w);
            break;
        case O_RATE:
            bad |= parse_u32(optarg, 0, 1000000, &rate);
            break;
        case O_TIMEOUT:
            bad |= parse_u32(optarg, 1, 86400, &ch.timeout_s);
            break;
        case O_RUNID:
            if (!valid_run_id(optarg)) {
                fprintf(stderr, "arq-chaos: --run-id: 1 to 100 of A-Z a-z 0-9 _ -\n");
                return 3;
            }
            strcpy(ch.run_id, optarg);
            break;
        case O_HBI:
            bad |= parse_u32(optarg, 0, 3600000, &ch.hb_interval);
            break;
        case O_HBT:
            bad |= parse_u32(optarg, 0, 3600000, &ch.hb_timeout);
            break;
        case O_BB:
            bad |= parse_u32(optarg, 1, 3600000, &ch.backoff_base);
            break;
        case O_BC:
            bad |= parse_u32(optarg, 1, 3600000, &ch.backoff_cap);
            break;
        case O_ACK:
            bad |= parse_u32(optarg, 1, 1000000, &ch.a);
            break;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 3;
        }
        if (bad) {
            fprintf(stderr, "arq-chaos: bad value for --%s: '%s'\n", longopts[opt - O_URL].name,
                    optarg);
            return 3;
        }
    }
    if (optind != argc || !ch.url || (uint64_t)ch.p * ch.m > UINT32_MAX - 1) {
        usage(stderr);
        return 3;
    }
    if (ch.k > ch.n)
        ch.k = ch.n;
    ch.rate = rate;
    if (!ch.run_id[0]) {
        uint8_t r[6];
        if (getrandom(r, sizeof(r), 0) != (ssize_t)sizeof(r)) {
            fprintf(stderr, "arq-chaos: getrandom: %s\n", strerror(errno));
            return 3;
        }
        for (int i = 0; i < 6; i++)
            snprintf(ch.run_id + 2 * i, 3, "%02x", r[i]);
    }
    (void)signal(SIGPIPE, SIG_IGN);
    clock_gettime(CLOCK_MONOTONIC, &ch.t0);
    ch.base = event_base_new();
    int code = 3;
    if (!ch.base) {
        fprintf(stderr, "arq-chaos: cannot create the event loop\n");
        goto out;
    }
    ch.ev_tick = event_new(ch.base, -1, EV_PERSIST, tick_cb, &ch);
    ch.ev_sigint = evsignal_new(ch.base, SIGINT, on_sigint, &ch);
    struct timeval tv = {0, TICK_MS * 1000};
    if (!ch.ev_tick || !ch.ev_sigint || event_add(ch.ev_tick, &tv) != 0 ||
        evsignal_add(ch.ev_sigint, NULL) != 0) {
        fprintf(stderr, "arq-chaos: cannot set up the event loop\n");
        goto out;
    }
    if (setup(&ch) != 0) {
        fprintf(stderr, "arq-chaos: setup failed\n");
        goto out;
    }
    fprintf(stderr, "arq-chaos: run %s: %u streams, %u publishers x %u messages, %u subscribers\n",
            ch.run_id, ch.n, ch.p, ch.m, ch.s);
    (void)event_base_dispatch(ch.base);
    code = ch.finished ? ch.finished - 1 : 3;
    if (ch.setup_error || code == 3)
        goto out;
    if (code == 0 || code == 1)
        verify(&ch);
    if (ch.violations) {
        if (ch.violations > MAX_REPORTED)
            fprintf(stderr, "arq-chaos: ... %" PRIu64 " violations in all\n", ch.violations);
        if (code == 0)
            code = 1;
    }
    struct totals t = totals(&ch);
    json_t *o = json_pack(
        "{s:I, s:I, s:i, s:i, s:I, s:I, s:I, s:I, s:f, s:I}", "acked", (json_int_t)ch.acked,
        "delivered", (json_int_t)ch.delivered, "publishers", (int)ch.p, "subscribers", (int)ch.s,
        "reconnects", (json_int_t)t.reconnects, "redeliveries_dropped", (json_int_t)t.dropped,
        "dup_pubacks", (json_int_t)ch.dup_pubacks, "violations", (json_int_t)ch.violations,
        "seconds", ms_since(&ch.t0) / 1000.0, "reconnect_attempts", (json_int_t)ch.attempts);
    char *s = o ? json_dumps(o, JSON_COMPACT | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(9)) : NULL;
    if (s)
        printf("%s\n", s);
    free(s);
    json_decref(o);
    fflush(stdout);
out:
    teardown(&ch);
    return code;
}

/*
 * arq - command-line client of the ARQ broker, on libarq.
 *
 *   arq [--url URL] [--token JWT] pub STREAM DATA|-  [--msgid-prefix P]
 *   arq [--url URL] [--token JWT] sub STREAM [--from earliest|latest|N] [--count N]
 *                                            [--state FILE]
 *
 * `sub` and `pub -` reconnect (libarq's reconnection: session resume,
 * re-subscribe, re-publish with the same msgids) unless --no-reconnect.
 * `sub --state FILE` keeps the position in FILE (JSON, written atomically)
 * so that the next run continues after the last message printed.
 *
 * Exit codes: 0 success, 1 failure (connection, nack, lost connection), 2 usage.
 */
#include <errno.h>
#include <event2/buffer.h>
#include <event2/event.h>
#include <getopt.h>
#include <inttypes.h>
#include <jansson.h>
#include <msgpack.h>
#include <openssl/evp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <libgen.h>
#include <sys/stat.h>
#include <unistd.h>

#include "arq.h"

#define ARQ_CLI_VERSION "0.1.0"
#define MAX_INFLIGHT    256
#define READ_CHUNK      65536
/* Reconnection defaults: give up after about 5 s (at most 13 s) of failed
 * attempts, so a broker restart is ridden out and a dead one reported. */
#define RETRIES_DEFAULT 10
#define BACKOFF_BASE_MS 100
#define BACKOFF_CAP_MS  2000
#define HB_INTERVAL_MS  5000
#define HB_TIMEOUT_MS   15000
#define STATE_WRITE_MS  200

static void usage(FILE *f)
{
    fprintf(f,
            "usage: arq [options] pub STREAM DATA     publish DATA, print its offset\n"
            "       arq [options] pub STREAM -        publish each stdin line, print offsets\n"
            "       arq [options] sub STREAM          print messages as JSON lines, ack them\n"
            "\n"
            "  -u, --url URL            ws://HOST:PORT/ws or wss://HOST/ws (default $ARQ_URL,\n"
            "                           else ws://127.0.0.1:8000/ws); HOST a name or address;\n"
            "                           several, comma-separated: failed over in order\n"
            "  -t, --token JWT          access token (HS256 JWT; default $ARQ_TOKEN)\n"
            "      --token-command CMD  run CMD (/bin/sh -c) for a token: its first output\n"
            "                           line; run again before every connection and ahead\n"
            "                           of the token's expiry, so a long run refreshes it\n"
            "      --ca FILE            wss: verify the server against the CAs in FILE\n"
            "                           (PEM) instead of the system's; verification is\n"
            "                           always on\n"
            "      --msgid-prefix P     pub: message ids P0, P1, ... (idempotent retries)\n"
            "      --ack LEVEL          pub: local or replicated (the puback waits for\n"
            "                           MySQL's commit); default: the server's wal.ack\n"
            "  -H, --header K=V         pub: a header on every message (repeatable; K is\n"
            "                           up to the first '=')\n"
            "      --from WHERE         sub: earliest (default), latest, or an offset >= 1\n"
            "      --count N            sub: exit 0 after N messages\n"
            "      --state FILE         sub: keep the position in FILE (JSON: stream, epoch,\n"
            "                           offset of the last message printed, session), written\n"
            "                           atomically at most every 200 ms and on exit; if FILE\n"
            "                           names STREAM, continue after that offset (overrides\n"
            "                           --from)\n"
            "      --no-reconnect       sub, pub -: fail on connection loss instead of\n"
            "                           reconnecting and resuming\n"
            "      --retries N          reconnection attempts in a row before giving up\n"
            "                           (default %d, 0 = unlimited)\n"
            "      --timeout MS         connect timeout per attempt (default 10000)\n"
            "  -V, --version            print the version\n"
            "  -h, --help               this text\n"
            "\n"
            "`sub` and `pub -` reconnect after a lost connection (backoff with jitter, session\n"
            "resume, re-subscribe after the last message printed, re-publish unacknowledged\n"
            "lines with the same msgid): no message is printed twice or skipped.\n"
            "\n"
            "Exit status: 0 success, 1 error, 2 usage error.\n",
            RETRIES_DEFAULT);
}

/* pub --header: the encoded map, of at most HDR_MAX bytes (the broker's own
 * limit is 8 KiB of keys and values; it answers a larger map with 413). */
#define HDR_MAX 16384
struct hdrbuf {
    size_t size;
    char data[HDR_MAX];
};

static int hdrbuf_write(void *data, const char *buf, size_t len)
{
    struct hdrbuf *h = data;
    if (len > HDR_MAX - h->size)
        return -1;
    memcpy(h->data + h->size, buf, len);
    h->size += len;
    return 0;
}

struct cli {
    struct event_base *base;
    arq_client_t *client;
    const char *stream;
    int exit_code;
    int done;

    /* pub */
    const char *data; /* NULL: stdin */
    const char *msgid_prefix;
    struct hdrbuf headers; /* pub --header K=V...: one msgpack map, or empty */
    /* pub -: line seq (0-based) is published with callback argument seq and
     * printed in input order. Slot seq % MAX_INFLIGHT holds its answer until
     * then, so at most MAX_INFLIGHT lines may be unprinted at once: a line
     * re-sent after a 503 holds back the window, never shares a slot. */
    uint64_t seq_next, seq_printed;
    int inflight;
    int have[MAX_INFLIGHT];
    uint64_t offsets[MAX_INFLIGHT];
    struct evbuffer *inbuf;
    struct event *ev_stdin;
    int stdin_regular, stdin_eof, failed;

    /* sub */
    enum arq_from from;
    uint64_t from_offset;
    uint64_t epoch;           /* ARQ_EPOCH_ANY: none */
    uint64_t count, received; /* count 0: unlimited */
    struct event *ev_sigint, *ev_sigterm;

    /* sub --state */
    const char *state_path;
    uint64_t st_offset; /* last message printed (or skipped by a gap) */
    uint64_t st_epoch;
    int st_known; /* st_offset is meaningful */
    int st_dirty; /* not written yet */
    int st_failed;
    struct event *ev_state;
};

static void finish(struct cli *c, int code);

/* "error: <reason>", with the server's code in front of its reasons. */
static void print_error(int status, const char *reason)
{
    if (status <= -100)
        fprintf(stderr, "error: %d %s\n", -status, reason);
    else
        fprintf(stderr, "error: %s\n", reason);
}

static void on_closed(arq_client_t *client, void *arg)
{
    struct cli *c = arg;
    event_base_loopbreak(c->base);
}

/* Stop: record the exit code, close cleanly (or break out at once). */
static void finish(struct cli *c, int code)
{
    if (c->done)
        return;
    c->done = 1;
    c->exit_code = code;
    if (c->ev_stdin)
        event_del(c->ev_stdin);
    if (arq_client_close(c->client, on_closed, c) != 0)
        event_base_loopbreak(c->base);
}

static void on_error(arq_client_t *client, int status, const char *reason, void *arg)
{
    struct cli *c = arg;
    arq_state_t st = arq_client_state(client);
    if (st == ARQ_STATE_FAILED || st == ARQ_STATE_CLOSED) {
        /* The client ended (lost without reconnect, or gave up). */
        if (!c->done)
            print_error(status, reason);
        c->done = 1;
        c->exit_code = 1;
        event_base_loopbreak(c->base);
        return;
    }
    fprintf(stderr, "error: %d %s\n", -status, reason);
}

static void on_state(arq_client_t *client, arq_state_t old, arq_state_t new_state, int status,
                     const char *reason, void *arg)
{
    struct cli *c = arg;
    if (c->done)
        return;
    if (new_state == ARQ_STATE_DISCONNECTED && old != ARQ_STATE_RECONNECTING)
        fprintf(stderr, "arq: %s; reconnecting\n", reason);
    else if (new_state == ARQ_STATE_RECOVERING)
        fprintf(stderr, "arq: reconnected (%s)\n", reason);
}

/* ---- pub ------------------------------------------------------------------ */

static void pub_feed(struct cli *c);

static void on_puback(arq_client_t *client, int status, uint64_t offset, int dup, void *arg)
{
    struct cli *c = arg;
    c->inflight--;
    if (status != 0) {
        if (!c->failed && !c->done)
            print_error(status, arq_client_last_error(client));
        c->failed = 1;
        finish(c, 1);
        return;
    }
    if (c->failed)
        return;
    pub_feed(c);
}

/* The callback argument carries the sequence number; a small heap cell.
 * Replies may come in any order: offsets are printed in input order. */
struct pubarg {
    struct cli *cli;
    uint64_t seq;
};

static void on_puback_seq(arq_client_t *client, int status, uint64_t offset, int dup, void *arg)
{
    struct pubarg *pa = arg;
    struct cli *c = pa->cli;
    uint64_t seq = pa->seq;
    free(pa);
    if (status == 0 && !c->failed) {
        c->have[seq % MAX_INFLIGHT] = 1;
        c->offsets[seq % MAX_INFLIGHT] = offset;
        while (c->seq_printed < c->seq_next && c->have[c->seq_printed % MAX_INFLIGHT]) {
            c->have[c->seq_printed % MAX_INFLIGHT] = 0;
            printf("%" PRIu64 "\n", c->offsets[c->seq_printed % MAX_INFLIGHT]);
            fflush(stdout);
            c->seq_printed++;
        }
    }
    on_puback(client, status, offset, dup, c);
}

static int pub_one(struct cli *c, const char *data, size_t len)
{
    char msgid[512];
    const char *mid = NULL;
    if (c->msgid_prefix) {
        int n = snprintf(msgid, sizeof(msgid), "%s%" PRIu64, c->msgid_prefix, c->seq_next);
        if (n < 0 || (size_t)n >= sizeof(msgid)) {
            fprintf(stderr, "error: --msgid-prefix too long\n");
            return -1;
        }
        mid = msgid;
    }
    struct pubarg *pa = malloc(sizeof(*pa));
    if (!pa) {
        fprintf(stderr, "error: out of memory\n");
        return -1;
    }
    pa->cli = c;
    pa->seq = c->seq_next;
    int rc =
        arq_publish_headers(c->client, c->stream, data, len, mid, (const uint8_t *)c->headers.data,
                            c->headers.size, on_puback_seq, pa);
    if (rc != 0) {
        free(pa);
        fprintf(stderr, "error: cannot publish: %s\n", arq_strerror(rc));
        return -1;
    }
    c->seq_next++;
    c->inflight++;
    return 0;
}

/* Publish lines while there is room; arm the stdin event when we need more. */
static void pub_feed(struct cli *c)
{
    if (!c->inbuf) { /* DATA on the command line: done when answered */
        if (c->inflight == 0)
            finish(c, 0);
        return;
    }
    while (!c->done && c->seq_next - c->seq_printed < MAX_INFLIGHT) {
        size_t n = 0;
        char *line = evbuffer_readln(c->inbuf, &n, EVBUFFER_EOL_LF);
        if (!line && c->stdin_eof && evbuffer_get_length(c->inbuf) > 0) {
            /* last line without a newline */
            n = evbuffer_get_length(c->inbuf);
            line = malloc(n + 1);
            if (line) {
                (void)evbuffer_remove(c->inbuf, line, n);
                line[n] = '\0';
            }
        }
        if (line) {
            int rc = pub_one(c, line, n);
            free(line);
            if (rc != 0) {
                finish(c, 1);
                return;
            }
            continue;
        }
        if (c->stdin_eof) {
            if (c->inflight == 0)
                finish(c, 0);
            return;
        }
        if (!c->stdin_regular) {
            if (event_add(c->ev_stdin, NULL) != 0) {
                fprintf(stderr, "error: cannot watch stdin\n");
                finish(c, 1);
            }
            return;
        }
        /* A regular file never blocks: read it inline. */
        int r = evbuffer_read(c->inbuf, STDIN_FILENO, READ_CHUNK);
        if (r < 0) {
            fprintf(stderr, "error: reading stdin: %s\n", strerror(errno));
            finish(c, 1);
            return;
        }
        if (r == 0)
            c->stdin_eof = 1;
    }
    if (c->ev_stdin)
        event_del(c->ev_stdin); /* full window: wait for pubacks */
}

static void stdin_cb(evutil_socket_t fd, short what, void *arg)
{
    struct cli *c = arg;
    int r = evbuffer_read(c->inbuf, STDIN_FILENO, READ_CHUNK);
    if (r < 0) {
        if (errno == EAGAIN || errno == EINTR)
            return;
        fprintf(stderr, "error: reading stdin: %s\n", strerror(errno));
        finish(c, 1);
        return;
    }
    if (r == 0) {
        c->stdin_eof = 1;
        event_del(c->ev_stdin);
    }
    pub_feed(c);
}

static void pub_start(struct cli *c)
{
    if (c->data) {
        if (pub_one(c, c->data, strlen(c->data)) != 0)
            finish(c, 1);
        else
            c->stdin_eof = 1; /* nothing more to send */
        return;
    }
    struct stat st;
    c->stdin_regular = fstat(STDIN_FILENO, &st) == 0 && !S_ISFIFO(st.st_mode) &&
                       !S_ISSOCK(st.st_mode) && !S_ISCHR(st.st_mode);
    c->inbuf = evbuffer_new();
    if (!c->inbuf) {
        fprintf(stderr, "error: out of memory\n");
        finish(c, 1);
        return;
    }
    if (!c->stdin_regular) {
        c->ev_stdin = event_new(c->base, STDIN_FILENO, EV_READ | EV_PERSIST, stdin_cb, c);
        if (!c->ev_stdin) {
            fprintf(stderr, "error: out of memory\n");
            finish(c, 1);
            return;
        }
    }
    pub_feed(c);
}

/* ---- sub ------------------------------------------------------------------ */

static char *b64(const uint8_t *p, size_t n)
{
    size_t outlen = 4 * ((n + 2) / 3) + 1;
    char *out = malloc(outlen);
    if (out)
        EVP_EncodeBlock((unsigned char *)out, p, (int)n);
    return out;
}

static int parse_u64(const char *s, uint64_t *out)
{
    if (!s || *s < '0' || *s > '9')
        return -1;
    char *e;
    errno = 0;
    unsigned long long v = strtoull(s, &e, 10);
    if (errno || *e)
        return -1;
    *out = v;
    return 0;
}

/* ---- sub --state ---------------------------------------------------------- */

/* Read FILE if it exists: 0 (position in c), 1 (no file), -1 (error printed). */
static int state_load(struct cli *c)
{
    struct stat st;
    if (stat(c->state_path, &st) != 0) {
        if (errno == ENOENT)
            return 1;
        fprintf(stderr, "error: state file '%s': %s\n", c->state_path, strerror(errno));
        return -1;
    }
    json_error_t jerr;
    json_t *o = json_load_file(c->state_path, 0, &jerr);
    if (!o) {
        fprintf(stderr, "error: state file '%s': %s\n", c->state_path, jerr.text);
        return -1;
    }
    const char *stream = json_string_value(json_object_get(o, "stream"));
    json_t *off = json_object_get(o, "offset");
    /* The epoch is a uint64: a decimal string, since JSON integers (and
     * jansson's) stop at 2^63 or less. */
    json_t *ep = json_object_get(o, "epoch");
    uint64_t epoch = 0;
    int rc = -1;
    if (!stream || !json_is_integer(off) || json_integer_value(off) < 0 ||
        (ep && !json_is_null(ep) && parse_u64(json_string_value(ep), &epoch) != 0)) {
        fprintf(stderr,
                "error: state file '%s': expected {\"stream\": str, \"offset\": int, "
                "\"epoch\": decimal str}\n",
                c->state_path);
    } else if (strcmp(stream, c->stream) != 0) {
        fprintf(stderr, "error: state file '%s' is for stream '%s', not '%s'\n", c->state_path,
                stream, c->stream);
    } else {
        c->st_offset = (uint64_t)json_integer_value(off);
        c->st_epoch = epoch;
        c->st_known = 1;
        c->from = ARQ_FROM_OFFSET;
        c->from_offset = c->st_offset + 1;
        c->epoch = c->st_epoch ? c->st_epoch : ARQ_EPOCH_ANY;
        rc = 0;
    }
    json_decref(o);
    return rc;
}

static int write_all(int fd, const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Write the position: FILE.tmp, fsync, rename over FILE, fsync the directory. */
static int state_write(struct cli *c)
{
    if (!c->state_path || !c->st_known || !c->st_dirty || c->st_failed)
        return 0;
    uint64_t epoch = 0;
    if (arq_subscription_epoch(c->client, c->stream, &epoch) != 0 || epoch == 0)
        epoch = c->st_epoch;
    json_t *o = json_object();
    const char *session = arq_client_session(c->client);
    char epoch_s[24];
    snprintf(epoch_s, sizeof(epoch_s), "%" PRIu64, epoch);
    int ok = o && json_object_set_new(o, "stream", json_string(c->stream)) == 0 &&
             json_object_set_new(o, "epoch", json_string(epoch_s)) == 0 &&
             json_object_set_new(o, "offset", json_integer((json_int_t)c->st_offset)) == 0 &&
             (!session || json_object_set_new(o, "session", json_string(session)) == 0);
    char *text = ok ? json_dumps(o, JSON_COMPACT | JSON_PRESERVE_ORDER) : NULL;
    json_decref(o);
    char tmp[4096], dir[4096];
    int n = snprintf(tmp, sizeof(tmp), "%s.tmp", c->state_path);
    const char *what = c->state_path;
    int fd = -1;
    errno = ENOMEM;
    if (!text)
        goto fail;
    errno = ENAMETOOLONG;
    if (n < 0 || (size_t)n >= sizeof(tmp) || strlen(c->state_path) >= sizeof(dir))
        goto fail;
    what = tmp;
    fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0 || write_all(fd, text, strlen(text)) != 0 || write_all(fd, "\n", 1) != 0 ||
        fsync(fd) != 0)
        goto fail;
    if (close(fd) != 0) {
        fd = -1;
        goto fail;
    }
    fd = -1;
    what = c->state_path;
    if (rename(tmp, c->state_path) != 0)
        goto fail;
    strcpy(dir, c->state_path);
    fd = open(dirname(dir), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd >= 0) {
        (void)fsync(fd); /* best effort: the rename is done either way */
        (void)close(fd);
    }
    free(text);
    c->st_dirty = 0;
    return 0;
fail:
    fprintf(stderr, "error: cannot write state file '%s': %s\n", what, strerror(errno));
    if (fd >= 0)
        (void)close(fd);
    free(text);
    c->st_failed = 1;
    return -1;
}

static void state_timer_cb(evutil_socket_t fd, short what, void *arg)
{
    struct cli *c = arg;
    if (state_write(c) != 0)
        finish(c, 1);
}

/* Record that everything up to offset is processed; written within 200 ms. */
static void state_advance(struct cli *c, uint64_t offset)
{
    if (!c->state_path)
        return;
    c->st_offset = offset;
    c->st_known = 1;
    c->st_dirty = 1;
    if (!evtimer_pending(c->ev_state, NULL)) {
        struct timeval tv = {0, STATE_WRITE_MS * 1000};
        (void)evtimer_add(c->ev_state, &tv);
    }
}

/* A delivered message's headers (a msgpack map of str -> str, checked by the
 * broker) as a JSON object; NULL if it is not one. */
static json_t *headers_json(const uint8_t *raw, size_t len)
{
    msgpack_unpacked u;
    msgpack_unpacked_init(&u);
    size_t off = 0;
    json_t *o = NULL;
    if (msgpack_unpack_next(&u, (const char *)raw, len, &off) == MSGPACK_UNPACK_SUCCESS &&
        u.data.type == MSGPACK_OBJECT_MAP && (o = json_object()) != NULL) {
        for (uint32_t i = 0; i < u.data.via.map.size; i++) {
            const msgpack_object *k = &u.data.via.map.ptr[i].key, *v = &u.data.via.map.ptr[i].val;
            json_t *val = k->type == MSGPACK_OBJECT_STR && v->type == MSGPACK_OBJECT_STR
                              ? json_stringn(v->via.str.ptr, v->via.str.size)
                              : NULL;
            /* json_object_setn_new refuses a key that is not UTF-8 (and frees val) */
            if (!val || json_object_setn_new(o, k->via.str.ptr, k->via.str.size, val) != 0) {
                json_decref(o);
                o = NULL;
                break;
            }
        }
    }
    msgpack_unpacked_destroy(&u);
    return o;
}

static void on_msg(arq_client_t *client, const arq_message_t *m, void *arg)
{
    struct cli *c = arg;
    if (c->done)
        return;
    json_t *o = json_object();
    /* json_stringn refuses invalid UTF-8: that is our text/binary test. */
    json_t *payload = m->payload_len <= (size_t)INT32_MAX
                          ? json_stringn((const char *)m->payload, m->payload_len)
                          : NULL;
    char *enc = NULL;
    int ok = o && json_object_set_new(o, "stream", json_string(m->stream)) == 0 &&
             json_object_set_new(o, "offset", json_integer((json_int_t)m->offset)) == 0 &&
             json_object_set_new(o, "ts", json_integer((json_int_t)m->ts_us)) == 0;
    if (ok && m->headers && m->headers_len) {
        json_t *h = headers_json(m->headers, m->headers_len);
        ok = h && json_object_set_new(o, "headers", h) == 0;
    }
    if (ok && payload) {
        ok = json_object_set_new(o, "payload", payload) == 0;
    } else if (ok) {
        enc = b64(m->payload, m->payload_len);
        ok = enc && json_object_set_new(o, "payload", json_string(enc)) == 0 &&
             json_object_set_new(o, "encoding", json_string("base64")) == 0;
    } else {
        json_decref(payload);
    }
    char *s = ok ? json_dumps(o, JSON_COMPACT | JSON_PRESERVE_ORDER | JSON_ENSURE_ASCII) : NULL;
    json_decref(o);
    free(enc);
    if (!s) {
        fprintf(stderr, "error: cannot encode message %" PRIu64 " as JSON\n", m->offset);
        finish(c, 1);
        return;
    }
    printf("%s\n", s);
    free(s);
    if (fflush(stdout) != 0) {
        fprintf(stderr, "error: writing stdout failed\n");
        finish(c, 1);
        return;
    }
    state_advance(c, m->offset);
    int rc = arq_ack(client, m->stream, m->offset);
    if (rc != 0) {
        fprintf(stderr, "error: cannot ack: %s\n", arq_strerror(rc));
        finish(c, 1);
        return;
    }
    if (c->count && ++c->received >= c->count)
        finish(c, 0);
}

static void sub_start(struct cli *c);

static void on_subok(arq_client_t *client, int status, uint64_t epoch, uint64_t first,
                     uint64_t next, void *arg)
{
    struct cli *c = arg;
    if (c->done)
        return;
    if (status == -409 && c->state_path && c->epoch != ARQ_EPOCH_ANY) {
        /* The state file's offsets belong to a history that was reset. */
        fprintf(stderr,
                "warning: stream '%s': epoch %" PRIu64 " of state file '%s' is gone (the "
                "stream's history was reset); starting from its earliest offset\n",
                c->stream, c->epoch, c->state_path);
        c->from = ARQ_FROM_EARLIEST;
        c->epoch = ARQ_EPOCH_ANY;
        c->st_known = 0;
        c->st_epoch = 0;
        sub_start(c);
        return;
    }
    if (status != 0) {
        if (!c->done)
            print_error(status, arq_client_last_error(client));
        finish(c, 1);
        return;
    }
    if (epoch)
        c->st_epoch = epoch;
    if (c->state_path && !c->st_known) {
        /* Everything before the first offset to deliver counts as processed,
         * so that the next run does not miss what arrives in between. */
        uint64_t start = c->from == ARQ_FROM_EARLIEST ? first
                         : c->from == ARQ_FROM_LATEST ? next
                                                      : c->from_offset;
        state_advance(c, start ? start - 1 : 0);
    }
}

static void on_gap(arq_client_t *client, const char *stream, uint64_t from, uint64_t to, void *arg)
{
    fprintf(stderr, "warning: stream '%s': offsets %" PRIu64 "..%" PRIu64 " no longer exist\n",
            stream, from, to);
    state_advance(arg, to);
}

static void on_epoch(arq_client_t *client, const char *stream, uint64_t old, uint64_t new_epoch,
                     void *arg)
{
    struct cli *c = arg;
    fprintf(stderr,
            "warning: stream '%s': epoch changed from %" PRIu64 " to %" PRIu64 " (the stream's "
            "history was reset); continuing in the new epoch\n",
            stream, old, new_epoch);
    c->st_epoch = new_epoch;
    c->st_known = 0; /* until the first message of the new epoch */
}

static void on_signal(evutil_socket_t sig, short what, void *arg)
{
    finish(arg, 0);
}

static void sub_start(struct cli *c)
{
    int rc =
        arq_subscribe(c->client, c->stream, c->from, c->from_offset, c->epoch, on_subok, on_msg, c);
    if (rc != 0) {
        fprintf(stderr, "error: cannot subscribe: %s\n", arq_strerror(rc));
        finish(c, 1);
    }
}

/* ---- main ----------------------------------------------------------------- */

static int is_pub;

/* --token-command: the command's first output line, as a new token. */
static int token_from_command(arq_client_t *client, char **ret_token, void *arg)
{
    (void)client;
    const char *cmd = arg;
    FILE *p = popen(cmd, "r");
    if (!p) {
        fprintf(stderr, "arq: --token-command: %s\n", strerror(errno));
        return ARQ_EINVAL;
    }
    char buf[8192];
    size_t n = fgets(buf, sizeof(buf), p) ? strcspn(buf, "\r\n") : 0;
    buf[n] = '\0';
    int st = pclose(p);
    if (st != 0 || n == 0) {
        fprintf(stderr, "arq: --token-command failed (status %d%s)\n", st,
                n == 0 ? ", no token printed" : "");
        return ARQ_EINVAL;
    }
    *ret_token = strdup(buf);
    return *ret_token ? 0 : ARQ_ENOMEM;
}

static void on_connect(arq_client_t *client, int status, void *arg)
{
    struct cli *c = arg;
    if (status != 0) {
        if (!c->done)
            print_error(status, arq_client_last_error(client));
        c->done = 1;
        c->exit_code = 1;
        event_base_loopbreak(c->base);
        return;
    }
    if (is_pub)
        pub_start(c);
    else
        sub_start(c);
}

int main(int argc, char **argv)
{
    enum {
        OPT_MSGID = 256,
        OPT_FROM,
        OPT_COUNT,
        OPT_TIMEOUT,
        OPT_STATE,
        OPT_NORECON,
        OPT_RETRIES,
        OPT_TOKEN_CMD,
        OPT_CA,
        OPT_ACK
    };
    enum { MAX_HEADERS = 64 };
    static const struct option longopts[] = {
        {"url", required_argument, NULL, 'u'},
        {"token", required_argument, NULL, 't'},
        {"token-command", required_argument, NULL, OPT_TOKEN_CMD},
        {"ca", required_argument, NULL, OPT_CA},
        {"ack", required_argument, NULL, OPT_ACK},
        {"msgid-prefix", required_argument, NULL, OPT_MSGID},
        {"header", required_argument, NULL, 'H'},
        {"from", required_argument, NULL, OPT_FROM},
        {"count", required_argument, NULL, OPT_COUNT},
        {"timeout", required_argument, NULL, OPT_TIMEOUT},
        {"state", required_argument, NULL, OPT_STATE},
        {"no-reconnect", no_argument, NULL, OPT_NORECON},
        {"retries", required_argument, NULL, OPT_RETRIES},
        {"version", no_argument, NULL, 'V'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    struct cli cli = {.from = ARQ_FROM_EARLIEST, .epoch = ARQ_EPOCH_ANY, .exit_code = 1};
    const char *url = getenv("ARQ_URL");
    const char *token = getenv("ARQ_TOKEN"), *from = NULL, *token_cmd = NULL, *ca = NULL;
    if (token && !*token)
        token = NULL;
    int have_count = 0, no_reconnect = 0, have_retries = 0, ack = ARQ_ACK_DEFAULT;
    const char *hdr[MAX_HEADERS];
    size_t n_hdr = 0;
    uint64_t timeout = 0, retries = RETRIES_DEFAULT;
    if (!url || !*url)
        url = "ws://127.0.0.1:8000/ws";

    int opt;
    while ((opt = getopt_long(argc, argv, "u:t:H:Vh", longopts, NULL)) != -1) {
        switch (opt) {
        case 'u':
            url = optarg;
            break;
        case 't':
            token = optarg;
            break;
        case OPT_TOKEN_CMD:
            token_cmd = optarg;
            break;
        case OPT_CA:
            ca = optarg;
            break;
        case OPT_ACK:
            if (strcmp(optarg, "local") == 0) {
                ack = ARQ_ACK_LOCAL;
            } else if (strcmp(optarg, "replicated") == 0) {
                ack = ARQ_ACK_REPLICATED;
            } else {
                fprintf(stderr, "arq: --ack needs local or replicated\n");
                return 2;
            }
            break;
        case OPT_MSGID:
            cli.msgid_prefix = optarg;
            break;
        case 'H':
            if (!strchr(optarg, '=') || optarg[0] == '=') {
                fprintf(stderr, "arq: --header needs KEY=VALUE\n");
                return 2;
            }
            if (n_hdr == MAX_HEADERS) {
                fprintf(stderr, "arq: at most %d --header\n", MAX_HEADERS);
                return 2;
            }
            hdr[n_hdr++] = optarg;
            break;
        case OPT_FROM:
            from = optarg;
            break;
        case OPT_COUNT:
            if (parse_u64(optarg, &cli.count) != 0 || cli.count == 0) {
                fprintf(stderr, "arq: --count needs a number >= 1\n");
                return 2;
            }
            have_count = 1;
            break;
        case OPT_TIMEOUT:
            if (parse_u64(optarg, &timeout) != 0 || timeout == 0 || timeout > 3600000) {
                fprintf(stderr, "arq: --timeout needs milliseconds (1..3600000)\n");
                return 2;
            }
            break;
        case OPT_STATE:
            if (!*optarg) {
                fprintf(stderr, "arq: --state needs a file name\n");
                return 2;
            }
            cli.state_path = optarg;
            break;
        case OPT_NORECON:
            no_reconnect = 1;
            break;
        case OPT_RETRIES:
            if (parse_u64(optarg, &retries) != 0 || retries > UINT32_MAX) {
                fprintf(stderr, "arq: --retries needs a number (0 = unlimited)\n");
                return 2;
            }
            have_retries = 1;
            break;
        case 'V':
            printf("arq %s\n", ARQ_CLI_VERSION);
            return 0;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    int npos = argc - optind;
    if (npos < 2) {
        usage(stderr);
        return 2;
    }
    const char *cmd = argv[optind];
    cli.stream = argv[optind + 1];
    if (strcmp(cmd, "pub") == 0) {
        is_pub = 1;
        if (npos != 3 || from || have_count || cli.state_path) {
            fprintf(stderr, "arq: usage: arq [options] pub STREAM DATA|- [--msgid-prefix P] "
                            "[--header K=V]...\n");
            return 2;
        }
        cli.data = strcmp(argv[optind + 2], "-") == 0 ? NULL : argv[optind + 2];
        if (cli.data && (no_reconnect || have_retries)) {
            fprintf(stderr, "arq: pub STREAM DATA does not reconnect; --no-reconnect and "
                            "--retries are for pub - and sub\n");
            return 2;
        }
    } else if (strcmp(cmd, "sub") == 0) {
        if (npos != 2 || cli.msgid_prefix || n_hdr) {
            fprintf(stderr, "arq: usage: arq [options] sub STREAM [--from earliest|latest|N] "
                            "[--count N] [--state FILE]\n");
            return 2;
        }
        if (!from || strcmp(from, "earliest") == 0) {
            cli.from = ARQ_FROM_EARLIEST;
        } else if (strcmp(from, "latest") == 0) {
            cli.from = ARQ_FROM_LATEST;
        } else if (parse_u64(from, &cli.from_offset) == 0 && cli.from_offset >= 1) {
            cli.from = ARQ_FROM_OFFSET;
        } else {
            fprintf(stderr, "arq: --from takes earliest, latest or an offset >= 1\n");
            return 2;
        }
    } else {
        fprintf(stderr, "arq: unknown command '%s'\n", cmd);
        usage(stderr);
        return 2;
    }
    if (n_hdr) {
        msgpack_packer pk;
        msgpack_packer_init(&pk, &cli.headers, hdrbuf_write);
        int bad = msgpack_pack_map(&pk, n_hdr);
        for (size_t i = 0; i < n_hdr && !bad; i++) {
            size_t kl = (size_t)(strchr(hdr[i], '=') - hdr[i]);
            bad = msgpack_pack_str_with_body(&pk, hdr[i], kl) ||
                  msgpack_pack_str_with_body(&pk, hdr[i] + kl + 1, strlen(hdr[i] + kl + 1));
        }
        if (bad) {
            fprintf(stderr, "arq: the headers are over %d bytes\n", HDR_MAX);
            return 2;
        }
    }
    if (strlen(cli.stream) == 0 || strlen(cli.stream) > 200) {
        fprintf(stderr, "arq: a stream name is 1 to 200 bytes\n");
        return 2;
    }
    if (cli.state_path) {
        int st = state_load(&cli);
        if (st < 0)
            return 1;
    }

    (void)signal(SIGPIPE, SIG_IGN);
    cli.base = event_base_new();
    if (!cli.base) {
        fprintf(stderr, "error: cannot create the event loop\n");
        return 1;
    }
    /* pub DATA is one request: it fails rather than waits for a broker. */
    int reconnect = !no_reconnect && !(is_pub && cli.data);
    arq_client_options_t o = {.url = url,
                              .token = token,
                              .client_name = "arq-cli/" ARQ_CLI_VERSION,
                              .connect_timeout_ms = (uint32_t)timeout,
                              .reconnect = reconnect,
                              .backoff_base_ms = BACKOFF_BASE_MS,
                              .backoff_cap_ms = BACKOFF_CAP_MS,
                              .max_retries = (uint32_t)retries,
                              .heartbeat_interval_ms = reconnect ? HB_INTERVAL_MS : 0,
                              .heartbeat_timeout_ms = reconnect ? HB_TIMEOUT_MS : 0,
                              .ca_file = ca,
                              .ack = ack};
    int rc = arq_client_new(cli.base, &o, &cli.client);
    if (rc != 0) {
        if (rc == ARQ_EINVAL)
            fprintf(stderr,
                    "error: invalid URL '%s' (expected ws://HOST[:PORT]/PATH or wss://...)%s\n",
                    url, ca ? ", or the --ca file cannot be loaded" : "");
        else
            fprintf(stderr, "error: %s\n", arq_strerror(rc));
        event_base_free(cli.base);
        return rc == ARQ_EINVAL ? 2 : 1;
    }
    if (token_cmd)
        arq_client_on_token(cli.client, token_from_command, (void *)token_cmd);
    arq_client_on_error(cli.client, on_error, &cli);
    arq_client_on_gap(cli.client, on_gap, &cli);
    arq_client_on_state(cli.client, on_state, &cli);
    arq_client_on_epoch(cli.client, on_epoch, &cli);
    if (cli.state_path && !(cli.ev_state = evtimer_new(cli.base, state_timer_cb, &cli))) {
        fprintf(stderr, "error: out of memory\n");
        cli.done = 1;
    }
    if (!is_pub) {
        cli.ev_sigint = evsignal_new(cli.base, SIGINT, on_signal, &cli);
        cli.ev_sigterm = evsignal_new(cli.base, SIGTERM, on_signal, &cli);
        if (!cli.ev_sigint || !cli.ev_sigterm || evsignal_add(cli.ev_sigint, NULL) != 0 ||
            evsignal_add(cli.ev_sigterm, NULL) != 0) {
            fprintf(stderr, "error: cannot install signal handlers\n");
            cli.done = 1;
        }
    }
    if (!cli.done) {
        rc = arq_client_connect(cli.client, on_connect, &cli);
        if (rc != 0)
            fprintf(stderr, "error: %s\n", arq_strerror(rc));
        else
            (void)event_base_dispatch(cli.base);
    }
    if (!cli.done) {
        /* The loop ran dry without a verdict: the connection ended. */
        fprintf(stderr, "error: %s\n", arq_client_last_error(cli.client));
        cli.exit_code = 1;
    }
    if (cli.state_path && state_write(&cli) != 0)
        cli.exit_code = 1;
    arq_client_free(cli.client);
    if (cli.ev_state)
        event_free(cli.ev_state);
    if (cli.ev_stdin)
        event_free(cli.ev_stdin);
    if (cli.inbuf)
        evbuffer_free(cli.inbuf);
    if (cli.ev_sigint)
        event_free(cli.ev_sigint);
    if (cli.ev_sigterm)
        event_free(cli.ev_sigterm);
    event_base_free(cli.base);
    if (fflush(stdout) != 0 || ferror(stdout)) {
        fprintf(stderr, "error: writing stdout failed\n");
        return 1;
    }
    return cli.exit_code;
}

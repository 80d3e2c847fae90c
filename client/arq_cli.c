/*
 * arq - command-line client of the ARQ broker, on libarq.
 *
 *   arq [--url URL] [--token JWT] pub STREAM DATA|-  [--msgid-prefix P]
 *   arq [--url URL] [--token JWT] sub STREAM [--from earliest|latest|N] [--count N]
 *
 * Exit codes: 0 success, 1 failure (connection, nack, lost connection), 2 usage.
 */
#include <errno.h>
#include <event2/buffer.h>
#include <event2/event.h>
#include <getopt.h>
#include <inttypes.h>
#include <jansson.h>
#include <openssl/evp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "arq.h"

#define ARQ_CLI_VERSION "0.1.0"
#define MAX_INFLIGHT    256
#define READ_CHUNK      65536

static void usage(FILE *f)
{
    fprintf(f, "usage: arq [options] pub STREAM DATA     publish DATA, print its offset\n"
               "       arq [options] pub STREAM -        publish each stdin line, print offsets\n"
               "       arq [options] sub STREAM          print messages as JSON lines, ack them\n"
               "\n"
               "  -u, --url URL            ws://HOST:PORT/ws (default $ARQ_URL, else\n"
               "                           ws://127.0.0.1:8000/ws)\n"
               "  -t, --token JWT          access token (HS256 JWT)\n"
               "      --msgid-prefix P     pub: message ids P0, P1, ... (idempotent retries)\n"
               "      --from WHERE         sub: earliest (default), latest, or an offset >= 1\n"
               "      --count N            sub: exit 0 after N messages\n"
               "      --timeout MS         connect timeout (default 10000)\n"
               "  -V, --version            print the version\n"
               "  -h, --help               this text\n"
               "\n"
               "Exit status: 0 success, 1 error, 2 usage error.\n");
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
    uint64_t count, received; /* count 0: unlimited */
    struct event *ev_sigint, *ev_sigterm;
};

static void finish(struct cli *c, int code);

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
    if (status == ARQ_ECONNLOST || status == ARQ_EPROTO) {
        fprintf(stderr, "error: %s\n", reason);
        c->done = 1;
        c->exit_code = 1;
        event_base_loopbreak(c->base);
        return;
    }
    fprintf(stderr, "error: %d %s\n", -status, reason);
}

/* ---- pub ------------------------------------------------------------------ */

static void pub_feed(struct cli *c);

static void on_puback(arq_client_t *client, int status, uint64_t offset, int dup, void *arg)
{
    struct cli *c = arg;
    c->inflight--;
    if (status != 0) {
        if (!c->failed) {
            if (status <= -100)
                fprintf(stderr, "error: %d %s\n", -status, arq_client_last_error(client));
            else
                fprintf(stderr, "error: %s\n", arq_client_last_error(client));
        }
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
    int rc = arq_publish(c->client, c->stream, data, len, mid, on_puback_seq, pa);
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
    while (!c->done && c->inflight < MAX_INFLIGHT) {
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
    fflush(stdout);
    free(s);
    int rc = arq_ack(client, m->stream, m->offset);
    if (rc != 0) {
        fprintf(stderr, "error: cannot ack: %s\n", arq_strerror(rc));
        finish(c, 1);
        return;
    }
    if (c->count && ++c->received >= c->count)
        finish(c, 0);
}

static void on_subok(arq_client_t *client, int status, uint64_t epoch, uint64_t first,
                     uint64_t next, void *arg)
{
    struct cli *c = arg;
    if (status != 0) {
        if (status <= -100)
            fprintf(stderr, "error: %d %s\n", -status, arq_client_last_error(client));
        else
            fprintf(stderr, "error: %s\n", arq_client_last_error(client));
        finish(c, 1);
    }
}

static void on_gap(arq_client_t *client, const char *stream, uint64_t from, uint64_t to, void *arg)
{
    fprintf(stderr, "warning: stream '%s': offsets %" PRIu64 "..%" PRIu64 " no longer exist\n",
            stream, from, to);
}

static void on_signal(evutil_socket_t sig, short what, void *arg)
{
    finish(arg, 0);
}

static void sub_start(struct cli *c)
{
    int rc = arq_subscribe(c->client, c->stream, c->from, c->from_offset, ARQ_EPOCH_ANY, on_subok,
                           on_msg, c);
    if (rc != 0) {
        fprintf(stderr, "error: cannot subscribe: %s\n", arq_strerror(rc));
        finish(c, 1);
    }
}

/* ---- main ----------------------------------------------------------------- */

static int is_pub;

static void on_connect(arq_client_t *client, int status, void *arg)
{
    struct cli *c = arg;
    if (status != 0) {
        if (status <= -100)
            fprintf(stderr, "error: %d %s\n", -status, arq_client_last_error(client));
        else
            fprintf(stderr, "error: %s\n", arq_client_last_error(client));
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

int main(int argc, char **argv)
{
    enum { OPT_MSGID = 256, OPT_FROM, OPT_COUNT, OPT_TIMEOUT };
    static const struct option longopts[] = {
        {"url", required_argument, NULL, 'u'},
        {"token", required_argument, NULL, 't'},
        {"msgid-prefix", required_argument, NULL, OPT_MSGID},
        {"from", required_argument, NULL, OPT_FROM},
        {"count", required_argument, NULL, OPT_COUNT},
        {"timeout", required_argument, NULL, OPT_TIMEOUT},
        {"version", no_argument, NULL, 'V'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    struct cli cli = {.from = ARQ_FROM_EARLIEST, .exit_code = 1};
    const char *url = getenv("ARQ_URL");
    const char *token = NULL, *from = NULL;
    int have_count = 0;
    uint64_t timeout = 0;
    if (!url || !*url)
        url = "ws://127.0.0.1:8000/ws";

    int opt;
    while ((opt = getopt_long(argc, argv, "u:t:Vh", longopts, NULL)) != -1) {
        switch (opt) {
        case 'u':
            url = optarg;
            break;
        case 't':
            token = optarg;
            break;
        case OPT_MSGID:
            cli.msgid_prefix = optarg;
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
        if (npos != 3 || from || have_count) {
            fprintf(stderr, "arq: usage: arq [options] pub STREAM DATA|- [--msgid-prefix P]\n");
            return 2;
        }
        cli.data = strcmp(argv[optind + 2], "-") == 0 ? NULL : argv[optind + 2];
    } else if (strcmp(cmd, "sub") == 0) {
        if (npos != 2 || cli.msgid_prefix) {
            fprintf(stderr, "arq: usage: arq [options] sub STREAM [--from earliest|latest|N] "
                            "[--count N]\n");
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
    if (strlen(cli.stream) == 0 || strlen(cli.stream) > 200) {
        fprintf(stderr, "arq: a stream name is 1 to 200 bytes\n");
        return 2;
    }

    (void)signal(SIGPIPE, SIG_IGN);
    cli.base = event_base_new();
    if (!cli.base) {
        fprintf(stderr, "error: cannot create the event loop\n");
        return 1;
    }
    arq_client_options_t o = {.url = url,
                              .token = token,
                              .client_name = "arq-cli/" ARQ_CLI_VERSION,
                              .connect_timeout_ms = (uint32_t)timeout};
    int rc = arq_client_new(cli.base, &o, &cli.client);
    if (rc != 0) {
        if (rc == ARQ_EINVAL)
            fprintf(stderr,
                    "error: invalid URL '%s' (expected ws://HOST:PORT/PATH with an IPv4 "
                    "address or localhost)\n",
                    url);
        else
            fprintf(stderr, "error: %s\n", arq_strerror(rc));
        event_base_free(cli.base);
        return rc == ARQ_EINVAL ? 2 : 1;
    }
    arq_client_on_error(cli.client, on_error, &cli);
    arq_client_on_gap(cli.client, on_gap, &cli);
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
    arq_client_free(cli.client);
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

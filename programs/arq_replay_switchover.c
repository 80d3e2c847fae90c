/*
 * arq_replay_switchover.c - arq-replay switchover: a planned move of the
 * lease from the active arqd to a standby (docs/ha.md "Switchover").
 *
 * It only asks (arq_lease.handoff = 1) and watches: the active node closes
 * its connections with 1001, drains everything it acknowledged into MySQL,
 * releases the lease and stands by; a standby takes the lease, rebuilds its
 * WAL from MySQL if it must, and serves. No acknowledged message is lost,
 * because the release waits for the drain.
 */
#include <getopt.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "arq_replay.h"

static const char switchover_usage[] =
    "usage: arq-replay switchover --database-url URL [--timeout SECONDS]\n"
    "\n"
    "Ask the arqd that holds the lease (ha.role = active | standby) to hand it\n"
    "over: it closes its connections (1001), drains every acknowledged message\n"
    "into MySQL, releases the lease and stands by; a standby takes over. Waits\n"
    "until another node holds the lease (default timeout 60 s).\n"
    "\n"
    "Exit status: 0 another node holds the lease; 1 no node held it, or none\n"
    "took it in time; 2 usage.\n";

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

struct so_ctx {
    uint64_t timeout_s;
};

static int so_opt(int c, const char *arg, void *ctx)
{
    struct so_ctx *x = ctx;
    if (c != RP_OPT_FIRST_FREE)
        return RP_USAGE;
    char *end;
    unsigned long long v = strtoull(arg, &end, 10);
    if (*arg < '0' || *arg > '9' || *end || v == 0 || v > 86400) {
        rp_err("switchover: --timeout takes seconds (1..86400), not '%s'", arg);
        return RP_USAGE;
    }
    x->timeout_s = v;
    return 0;
}

int rp_cmd_switchover(rp_opts_t *o, int argc, char **argv)
{
    static const struct option extra[] = {
        {"timeout", required_argument, NULL, RP_OPT_FIRST_FREE},
        {NULL, 0, NULL, 0},
    };
    struct so_ctx x = {.timeout_s = 60};
    int oi;
    int rc = rp_parse(o, argc, argv, switchover_usage, extra, so_opt, &x, &oi);
    if (rc)
        return rc < 0 ? RP_OK : rc;
    if (oi != argc) {
        rp_err("switchover: unexpected argument '%s'", argv[oi]);
        return RP_USAGE;
    }
    if (!o->db_url || !*o->db_url) {
        rp_err("switchover: needs --database-url URL (or DATABASE_URL)");
        return RP_USAGE;
    }
    sync_url_t u;
    char err[512];
    if (sync_url_parse(o->db_url, &u, err, sizeof(err)) != 0) {
        rp_err("switchover: %s", err);
        return RP_USAGE;
    }
    sync_lease_row_t was, now;
    int64_t t0 = mono_ms();
    rc = sync_lease_request_handoff(&u, &was, err, sizeof(err));
    if (rc) {
        rp_err("switchover: %s", err);
        sync_url_free(&u);
        return RP_PROBLEMS;
    }
    rp_say(o, "asked '%s' (generation %" PRIu64 ") to hand the lease over\n", was.owner,
           was.generation);
    sync_lease_t *l = NULL;
    if (sync_lease_open(&u, "", 1000, &l) != SYNC_OK)
        l = NULL;
    rc = RP_PROBLEMS;
    bool done = false, released = false;
    int64_t released_ms = 0;
    while (l && mono_ms() - t0 < (int64_t)x.timeout_s * 1000) {
        struct timespec ts = {0, 50 * 1000000};
        nanosleep(&ts, NULL);
        if (sync_lease_read(l, &now, err, sizeof(err)) != SYNC_OK)
            continue; /* MySQL may be busy: ask again */
        if (!released && now.generation == was.generation && now.expires_us == 0) {
            released = true;
            released_ms = mono_ms() - t0;
        }
        if (now.generation > was.generation && now.owner[0]) {
            done = true;
            break;
        }
    }
    int64_t took = mono_ms() - t0;
    if (done) {
        rc = RP_OK;
        if (o->json) {
            json_t *j = json_object();
            json_object_set_new(j, "ok", json_true());
            json_object_set_new(j, "from", json_string(was.owner));
            json_object_set_new(j, "from_generation", json_integer((json_int_t)was.generation));
            json_object_set_new(j, "to", json_string(now.owner));
            json_object_set_new(j, "to_generation", json_integer((json_int_t)now.generation));
            json_object_set_new(j, "released_ms", json_integer(released ? released_ms : -1));
            json_object_set_new(j, "ms", json_integer(took));
            if (rp_json_print(j) != 0)
                rc = RP_PROBLEMS;
        } else {
            printf("switchover: '%s' (generation %" PRIu64 ") -> '%s' (generation %" PRIu64
                   ") in %" PRId64 " ms\n",
                   was.owner, was.generation, now.owner, now.generation, took);
        }
    } else {
        rp_err("switchover: no other node took the lease within %" PRIu64 " s (%s); the "
               "request stays until the owner acts on it",
               x.timeout_s, released ? "it was released" : "it was not released yet");
    }
    sync_lease_close(l);
    sync_url_free(&u);
    return rc;
}

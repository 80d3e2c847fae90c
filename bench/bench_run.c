/* bench_run.c - see bench_run.h. */
#include "bench_run.h"

#include <stddef.h>
#include <time.h>

static struct timeval tv_of(double s)
{
    return (struct timeval){(time_t)s, (suseconds_t)((s - (double)(time_t)s) * 1e6)};
}

void bench_run_check_drained(bench_run_t *r)
{
    if (r->phase == BENCH_PH_STOP && *r->inflight == 0)
        event_base_loopbreak(r->base);
}

static void on_timer(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    bench_run_t *r = arg;
    if (r->phase == BENCH_PH_WARMUP) {
        bench_window_begin(&r->m, r->server_pid);
        r->phase = BENCH_PH_MEASURE;
        struct timeval tv = tv_of(r->seconds);
        event_add(r->ev, &tv);
        return;
    }
    bench_window_end(&r->m, r->server_pid);
    r->phase = BENCH_PH_STOP; /* no new requests; the loop ends once the last are answered */
    bench_run_check_drained(r);
    struct timeval tv = {10, 0}; /* the answers still out get this long */
    event_add(r->drain, &tv);
}

static void on_drain_timeout(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    bench_run_t *r = arg;
    r->drain_timeout();
}

int bench_run_start(bench_run_t *r, struct event_base *base, const uint64_t *inflight,
                    double warmup, double seconds, long server_pid, void (*drain_timeout)(void))
{
    r->base = base;
    r->phase = BENCH_PH_WARMUP;
    r->inflight = inflight;
    r->warmup = warmup;
    r->seconds = seconds;
    r->server_pid = server_pid;
    r->drain_timeout = drain_timeout;
    r->ev = event_new(r->base, -1, 0, on_timer, r);
    r->drain = event_new(r->base, -1, 0, on_drain_timeout, r);
    if (r->ev == NULL || r->drain == NULL)
        return -1;
    struct timeval tv = tv_of(r->warmup);
    return event_add(r->ev, &tv);
}

void bench_run_free(bench_run_t *r)
{
    if (r->m.probe != NULL)
        bench_stall_stop(r->m.probe, &r->m.stalls);
    r->m.probe = NULL;
    if (r->ev != NULL)
        event_free(r->ev);
    if (r->drain != NULL)
        event_free(r->drain);
    r->ev = r->drain = NULL;
}

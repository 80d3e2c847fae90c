/*
 * bench_run.h - the schedule the peer generators (arq-nats-bench,
 * arq-redis-bench) share on their libevent loop: a warm-up, the measurement
 * window (bench_window_t: times, CPU, machine stalls), then no new requests
 * and a drain that ends the loop once the last answers are in, or fails
 * after 10 s.
 */
#ifndef ARQ_BENCH_RUN_H
#define ARQ_BENCH_RUN_H

#include <event2/event.h>
#include <stdint.h>

#include "bench_util.h"

enum { BENCH_PH_WARMUP, BENCH_PH_MEASURE, BENCH_PH_STOP };

typedef struct bench_run {
    struct event_base *base;
    int phase;                   /* BENCH_PH_*; the tool reads it */
    const uint64_t *inflight;    /* requests not yet answered (the tool's counter) */
    double warmup, seconds;      /* the window's start and length */
    long server_pid;             /* the server, whose CPU is timed too (0: none) */
    void (*drain_timeout)(void); /* the answers still out after 10 s: the tool fails */
    bench_window_t m;            /* the window, once it has ended (m.t1 != 0) */
    struct event *ev, *drain;
} bench_run_t;

/* Schedules the window on base: a warm-up of `warmup` s, then `seconds`
 * measured (with server_pid's CPU; 0: none); *inflight counts the requests
 * not yet answered, drain_timeout fails the run. 0, or -1. */
int bench_run_start(bench_run_t *r, struct event_base *base, const uint64_t *inflight,
                    double warmup, double seconds, long server_pid, void (*drain_timeout)(void));
/* Call from the tool's read path: ends the loop once stopped and drained. */
void bench_run_check_drained(bench_run_t *r);
/* Stops a probe still running (a run that ended early) and frees the events. */
void bench_run_free(bench_run_t *r);

#endif

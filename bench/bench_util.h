/*
 * bench_util.h - pieces both benchmarks share: a monotonic clock, the
 * log-linear latency histogram buckets, number and JSON formatting.
 */
#ifndef ARQ_BENCH_UTIL_H
#define ARQ_BENCH_UTIL_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

/* Buckets of the latency histogram: exact below 32 ns, then 32 sub-buckets
 * per power of two (about 3% resolution); 1920 cover every uint64_t. */
#define BENCH_LAT_BUCKETS 1920u

uint64_t bench_now_ns(void); /* CLOCK_MONOTONIC */
unsigned bench_lat_bucket(uint64_t ns);
double bench_lat_bucket_mid_ns(unsigned bucket);
/* A latency histogram in those buckets. */
typedef struct bench_hist {
    uint64_t n;
    uint64_t b[BENCH_LAT_BUCKETS];
} bench_hist_t;
void bench_hist_add(bench_hist_t *h, uint64_t ns);
/* Adds every sample of src to dst. */
void bench_hist_merge(bench_hist_t *dst, const bench_hist_t *src);
/* The q-quantile in microseconds (its bucket's middle); 0 if empty. */
double bench_hist_q_us(const bench_hist_t *h, double q);
/* Blocking send of all n bytes (retries EINTR, no SIGPIPE): 0, or -1. */
int bench_send_all(int fd, const void *p, size_t n);
/* Non-blocking send of p[*off..len) (retries EINTR, no SIGPIPE), advancing
 * *off: 0 when all is sent, 1 when the socket is full (EAGAIN), -1 on an
 * error (errno set). */
int bench_send_some(int fd, const uint8_t *p, size_t len, size_t *off);
/* Blocking TCP connect to host:port with TCP_NODELAY: the fd, or -1. */
int bench_tcp_connect(const char *host, const char *port);
/* scheme "://" host ":" port, e.g. "redis://127.0.0.1:6379", into host and
 * port (NUL-terminated): 0, or -1 if url is not of that form or too long. */
int bench_parse_url(const char *url, const char *scheme, char *host, size_t host_cap, char *port,
                    size_t port_cap);
/* s as a number in [lo, hi] (the whole string): 0, or -1. */
int bench_parse_num(const char *s, double lo, double hi, double *out);

/* An output buffer sent without blocking (arq-bench, arq-nats-bench, arq-redis-bench). */
typedef struct bench_out {
    uint8_t *p;
    size_t len, off, cap; /* p[off..len) is still to send */
} bench_out_t;
/* Appends n bytes: 0, or -1 when out of memory. */
int bench_out_add(bench_out_t *o, const void *p, size_t n);
/* Sends what is queued: 0 when all is sent (the buffer is then empty), 1
 * when the socket is full, -1 on an error (errno set). */
int bench_out_flush(bench_out_t *o, int fd);
void bench_out_free(bench_out_t *o);

/* utime + stime of this process in seconds (getrusage). */
double bench_self_cpu_sec(void);
/* utime + stime of a process in seconds (/proc/PID/stat), or -1. */
double bench_proc_cpu_sec(long pid);
/* 1234567.8 -> "1,234,568" (into buf, returned) */
const char *bench_fmt_count(char *buf, size_t len, double v);
/* s as a JSON string literal. */
void bench_json_str(FILE *f, const char *s);

/* Machine stalls: a thread that sleeps BENCH_STALL_SLEEP_NS at a time and
 * counts the wakes that came more than BENCH_STALL_NS late, i.e. the moments
 * nothing on the machine ran it for that long. On this project's VMs those
 * are the host pausing every vCPU at once (docs/benchmarks.md, "Machine
 * stalls"); a latency figure taken across them says as much about the host
 * as about the program measured. */
#define BENCH_STALL_SLEEP_NS 1000000ull
#define BENCH_STALL_NS       4000000ull

typedef struct bench_stalls {
    uint64_t wakes;    /* sleeps completed */
    uint64_t stalls;   /* of them, late by more than BENCH_STALL_NS */
    double stalled_ms; /* lateness of those, summed */
    double max_ms;     /* the latest wake */
} bench_stalls_t;

typedef struct bench_stall_probe bench_stall_probe_t;

/* Starts the probe thread; NULL if it could not be started. */
bench_stall_probe_t *bench_stall_start(void);
/* Stops it and returns what it saw; p may be NULL (all zero). */
void bench_stall_stop(bench_stall_probe_t *p, bench_stalls_t *ret);

/* A measurement window: its times, this process's and the server's CPU
 * (server_pid 0: none) and the machine stalls in between. */
typedef struct bench_window {
    uint64_t t0, t1;
    double cpu0, cpu1, srv0, srv1;
    bench_stall_probe_t *probe;
    bench_stalls_t stalls;
} bench_window_t;
void bench_window_begin(bench_window_t *w, long server_pid);
void bench_window_end(bench_window_t *w, long server_pid);
/* Seconds, this process's CPU in cores, the server's (or -1). */
double bench_window_s(const bench_window_t *w);
double bench_window_cpu(const bench_window_t *w);
double bench_window_server_cpu(const bench_window_t *w);

#endif

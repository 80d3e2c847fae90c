/* bench_util.c - see bench_util.h. */
#include "bench_util.h"

#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

uint64_t bench_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

unsigned bench_lat_bucket(uint64_t ns)
{
    if (ns < 32)
        return (unsigned)ns;
    unsigned msb = 63u - (unsigned)__builtin_clzll(ns);
    unsigned b = 32u + (msb - 5u) * 32u + (unsigned)((ns >> (msb - 5u)) & 31u);
    return b < BENCH_LAT_BUCKETS ? b : BENCH_LAT_BUCKETS - 1;
}

double bench_lat_bucket_mid_ns(unsigned b)
{
    if (b < 32)
        return b;
    unsigned shift = (b - 32u) / 32u, sub = (b - 32u) % 32u;
    double lo = (double)((32ull + sub) << shift);
    return lo + (double)(1ull << shift) / 2;
}

const char *bench_fmt_count(char *buf, size_t len, double v)
{
    char digits[32];
    unsigned long long n = v < 0 ? 0 : (unsigned long long)(v + 0.5);
    int nd = snprintf(digits, sizeof digits, "%llu", n);
    size_t o = 0;
    for (int i = 0; i < nd && o + 2 < len; i++) {
        if (i > 0 && (nd - i) % 3 == 0)
            buf[o++] = ',';
        buf[o++] = digits[i];
    }
    buf[o] = '\0';
    return buf;
}

void bench_json_str(FILE *f, const char *s)
{
    fputc('"', f);
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\')
            fprintf(f, "\\%c", c);
        else if (c < 0x20)
            fprintf(f, "\\u%04x", c);
        else
            fputc(c, f);
    }
    fputc('"', f);
}

struct bench_stall_probe {
    pthread_t thread;
    bool stop; /* atomic */
    bench_stalls_t st;
};

static void *stall_main(void *arg)
{
    bench_stall_probe_t *p = arg;
    const struct timespec d = {0, (long)BENCH_STALL_SLEEP_NS};
    while (!__atomic_load_n(&p->stop, __ATOMIC_ACQUIRE)) {
        uint64_t t0 = bench_now_ns();
        nanosleep(&d, NULL);
        uint64_t dt = bench_now_ns() - t0;
        uint64_t late = dt > BENCH_STALL_SLEEP_NS ? dt - BENCH_STALL_SLEEP_NS : 0;
        p->st.wakes++;
        if (late > BENCH_STALL_NS) {
            p->st.stalls++;
            p->st.stalled_ms += (double)late / 1e6;
        }
        if ((double)late / 1e6 > p->st.max_ms)
            p->st.max_ms = (double)late / 1e6;
    }
    return NULL;
}

bench_stall_probe_t *bench_stall_start(void)
{
    bench_stall_probe_t *p = calloc(1, sizeof *p);
    if (p && pthread_create(&p->thread, NULL, stall_main, p) != 0) {
        free(p);
        p = NULL;
    }
    return p;
}

void bench_stall_stop(bench_stall_probe_t *p, bench_stalls_t *ret)
{
    memset(ret, 0, sizeof *ret);
    if (!p)
        return;
    __atomic_store_n(&p->stop, true, __ATOMIC_RELEASE);
    pthread_join(p->thread, NULL);
    *ret = p->st;
    free(p);
}

void bench_hist_add(bench_hist_t *h, uint64_t ns)
{
    h->b[bench_lat_bucket(ns)]++;
    h->n++;
}

void bench_hist_merge(bench_hist_t *dst, const bench_hist_t *src)
{
    for (unsigned b = 0; b < BENCH_LAT_BUCKETS; b++)
        dst->b[b] += src->b[b];
    dst->n += src->n;
}

double bench_hist_q_us(const bench_hist_t *h, double q)
{
    if (h->n == 0)
        return 0;
    uint64_t rank = (uint64_t)(q * (double)h->n);
    if (rank < 1)
        rank = 1;
    uint64_t seen = 0;
    for (unsigned b = 0; b < BENCH_LAT_BUCKETS; b++) {
        seen += h->b[b];
        if (seen >= rank)
            return bench_lat_bucket_mid_ns(b) / 1e3;
    }
    return bench_lat_bucket_mid_ns(BENCH_LAT_BUCKETS - 1) / 1e3;
}

double bench_proc_cpu_sec(long pid)
{
    if (pid <= 0)
        return -1;
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%ld/stat", pid);
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return -1;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    char *p = strrchr(buf, ')'); /* after the command name, which may hold spaces */
    if (p == NULL)
        return -1;
    unsigned long long ut = 0, st = 0;
    /* fields 3..15: state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
     * utime stime */
    if (sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &ut, &st) != 2)
        return -1;
    long hz = sysconf(_SC_CLK_TCK);
    return (double)(ut + st) / (double)(hz > 0 ? hz : 100);
}

int bench_send_all(int fd, const void *p, size_t n)
{
    const char *c = p;
    while (n > 0) {
        ssize_t w = send(fd, c, n, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return -1;
        c += w;
        n -= (size_t)w;
    }
    return 0;
}

int bench_send_some(int fd, const uint8_t *p, size_t len, size_t *off)
{
    while (*off < len) {
        ssize_t w = send(fd, p + *off, len - *off, MSG_NOSIGNAL);
        if (w > 0) {
            *off += (size_t)w;
            continue;
        }
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return 1;
        return -1;
    }
    return 0;
}

int bench_tcp_connect(const char *host, const char *port)
{
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *ai;
    if (getaddrinfo(host, port, &hints, &ai) != 0)
        return -1;
    int fd = socket(ai->ai_family, SOCK_STREAM, 0);
    if (fd >= 0 && connect(fd, ai->ai_addr, ai->ai_addrlen) != 0) {
        int e = errno;
        close(fd);
        fd = -1;
        errno = e;
    }
    freeaddrinfo(ai);
    if (fd >= 0) {
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    return fd;
}

int bench_parse_url(const char *url, const char *scheme, char *host, size_t host_cap, char *port,
                    size_t port_cap)
{
    size_t sl = strlen(scheme);
    if (strncmp(url, scheme, sl) != 0 || strncmp(url + sl, "://", 3) != 0)
        return -1;
    const char *h = url + sl + 3, *colon = strrchr(h, ':');
    if (colon == NULL || colon == h || (size_t)(colon - h) >= host_cap)
        return -1;
    size_t pl = strlen(colon + 1);
    if (pl == 0 || pl >= port_cap || strspn(colon + 1, "0123456789") != pl)
        return -1;
    snprintf(host, host_cap, "%.*s", (int)(colon - h), h);
    snprintf(port, port_cap, "%s", colon + 1);
    return 0;
}

int bench_parse_num(const char *s, double lo, double hi, double *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || *end || end == s || !(v >= lo) || !(v <= hi))
        return -1;
    *out = v;
    return 0;
}

int bench_out_add(bench_out_t *o, const void *p, size_t n)
{
    if (o->off > 0 && o->off == o->len)
        o->off = o->len = 0;
    if (o->len + n > o->cap && o->off > 0) {
        /* drop what a partial send already took before growing */
        memmove(o->p, o->p + o->off, o->len - o->off);
        o->len -= o->off;
        o->off = 0;
    }
    if (o->len + n > o->cap) {
        size_t cap = o->cap ? o->cap * 2 : 65536;
        while (cap < o->len + n)
            cap *= 2;
        uint8_t *q = realloc(o->p, cap);
        if (q == NULL)
            return -1;
        o->p = q;
        o->cap = cap;
    }
    memcpy(o->p + o->len, p, n);
    o->len += n;
    return 0;
}

int bench_out_flush(bench_out_t *o, int fd)
{
    int rc = bench_send_some(fd, o->p, o->len, &o->off);
    if (rc == 0)
        o->off = o->len = 0;
    return rc;
}

void bench_out_free(bench_out_t *o)
{
    free(o->p);
    *o = (bench_out_t){0};
}

double bench_self_cpu_sec(void)
{
    struct rusage r;
    getrusage(RUSAGE_SELF, &r);
    return (double)r.ru_utime.tv_sec + (double)r.ru_utime.tv_usec / 1e6 +
           (double)r.ru_stime.tv_sec + (double)r.ru_stime.tv_usec / 1e6;
}

void bench_window_begin(bench_window_t *w, long server_pid)
{
    w->probe = bench_stall_start();
    w->cpu0 = bench_self_cpu_sec();
    w->srv0 = bench_proc_cpu_sec(server_pid);
    w->t0 = bench_now_ns();
}

void bench_window_end(bench_window_t *w, long server_pid)
{
    w->t1 = bench_now_ns();
    w->cpu1 = bench_self_cpu_sec();
    w->srv1 = bench_proc_cpu_sec(server_pid);
    bench_stall_stop(w->probe, &w->stalls);
    w->probe = NULL;
}

double bench_window_s(const bench_window_t *w)
{
    return (double)(w->t1 - w->t0) / 1e9;
}

double bench_window_cpu(const bench_window_t *w)
{
    return (w->cpu1 - w->cpu0) / bench_window_s(w);
}

double bench_window_server_cpu(const bench_window_t *w)
{
    return w->srv0 >= 0 && w->srv1 >= 0 ? (w->srv1 - w->srv0) / bench_window_s(w) : -1;
}

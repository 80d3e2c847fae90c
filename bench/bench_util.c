/* bench_util.c - see bench_util.h. */
#include "bench_util.h"

#include <time.h>

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

/* log.c - logfmt / JSON lines on stderr (see log.h). */
#include "log.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

static enum arq_log_level min_level = ARQ_LOG_INFO;
static int as_json;
static const char *const names[] = {"debug", "info", "warn", "error"};

int arq_log_setup(const char *level, int json)
{
    for (int i = 0; i < 4; i++) {
        if (level && strcmp(level, names[i]) == 0) {
            min_level = (enum arq_log_level)i;
            as_json = json;
            return 0;
        }
    }
    return -1;
}

int arq_log_enabled(enum arq_log_level level)
{
    return level >= min_level;
}

static void put_value(FILE *f, const char *v)
{
    int quote = as_json || *v == '\0' || strpbrk(v, " =\"\\\t\n") != NULL;
    if (quote)
        fputc('"', f);
    for (const char *p = v; *p; p++) {
        unsigned char ch = (unsigned char)*p;
        if (ch == '"' || ch == '\\')
            fprintf(f, "\\%c", ch);
        else if (ch < 0x20)
            fprintf(f, "\\u%04x", ch);
        else
            fputc(ch, f);
    }
    if (quote)
        fputc('"', f);
}

void arq_log(enum arq_log_level level, const char *event, ...)
{
    if (level < min_level)
        return;
    struct timeval tv;
    gettimeofday(&tv, NULL);
    struct tm tm;
    gmtime_r(&tv.tv_sec, &tm);
    char ts[64];
    size_t n = strftime(ts, sizeof(ts), "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(ts + n, sizeof(ts) - n, ".%03dZ", (int)(tv.tv_usec / 1000) % 1000);
    flockfile(stderr);
    if (as_json)
        fprintf(stderr, "{\"ts\":\"%s\",\"level\":\"%s\",\"event\":", ts, names[level]);
    else
        fprintf(stderr, "ts=%s level=%s event=", ts, names[level]);
    put_value(stderr, event);
    va_list ap;
    va_start(ap, event);
    for (;;) {
        const char *k = va_arg(ap, const char *);
        if (!k)
            break;
        const char *v = va_arg(ap, const char *);
        if (as_json) {
            fputc(',', stderr);
            put_value(stderr, k);
            fputc(':', stderr);
        } else {
            fprintf(stderr, " %s=", k);
        }
        put_value(stderr, v ? v : "");
    }
    va_end(ap);
    fputs(as_json ? "}\n" : "\n", stderr);
    funlockfile(stderr);
}

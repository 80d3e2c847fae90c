/*
 * log.h - one line per event, logfmt (default) or JSON, level-filtered.
 * Callers pass key=value pairs as alternating strings; values are quoted
 * as needed. Never pass payloads or secrets.
 */
#ifndef ARQ_API_LOG_H
#define ARQ_API_LOG_H

enum arq_log_level { ARQ_LOG_DEBUG = 0, ARQ_LOG_INFO, ARQ_LOG_WARN, ARQ_LOG_ERROR };

/* level: "debug"|"info"|"warn"|"error"; json: 0 logfmt, 1 JSON lines. */
int arq_log_setup(const char *level, int json);
int arq_log_enabled(enum arq_log_level level);
/* arq_log(ARQ_LOG_INFO, "listening", "host", "127.0.0.1", "port", "8000", NULL) */
void arq_log(enum arq_log_level level, const char *event, ...);

#endif

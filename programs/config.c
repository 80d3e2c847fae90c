/*
 * config.c - arqd's configuration (contract in config.h).
 *
 * Every key is described once, in keys[] below: its INI section and name,
 * its environment variable (if any), its type and its valid range. All three
 * parsers (INI, environment, --set) end in set_value(), so a value is checked
 * the same way whatever its source, and each error message starts with the
 * source: "line 12: server.port: ...", "API_PORT (server.port): ..." or
 * "server.port: ...".
 *
 * Values:
 *   integers   decimal digits only: no sign, no spaces, no trailing junk.
 *   sizes      (*_bytes and wal.map_size_max) an integer with an optional
 *              binary suffix K, M or G (case-insensitive): "16G", "512k".
 *   enums      case-insensitive, stored in lowercase.
 *   strings    no control characters; host and origins also no spaces.
 *   secrets    auth.secret_key and auth.api_key: empty means unset. Their
 *              values never appear in an error message or in the output of
 *              arq_config_print().
 *   url        database.url: empty means unset, otherwise
 *              mysql://user[:password]@host[:port][/database] (a driver
 *              suffix as in "mysql+pymysql://" is accepted and dropped). The
 *              password is shown as "***" in errors and in the output.
 *
 * INI documents: unknown sections and keys, keys outside a section, a key
 * given twice, lines longer than CONFIG_LINE_MAX bytes (inih's line buffer
 * would silently split them) and NUL bytes are errors. Leading whitespace is
 * stripped before inih sees a line, which turns off inih's continuation lines
 * (an indented "key = value" would otherwise extend the previous key's value).
 * Documents larger than CONFIG_TEXT_MAX are rejected.
 *
 * The environment: only the variables named in keys[] are read, everything
 * else is ignored. A variable given twice counts once (the first, as
 * getenv(3) sees it).
 */
#include "config.h"

#include <ctype.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include <ini.h>

#include "addr.h"

/* inih's buffer holds a line plus "\r\n\0" (ini.h, INI_MAX_LINE). */
#define CONFIG_LINE_MAX (INI_MAX_LINE - 3)
#define CONFIG_TEXT_MAX (1024u * 1024u)

/* Longest value accepted for a string key, and for an origin. */
#define STRING_MAX       1024u
#define ORIGIN_MAX       255u
#define ORIGINS_MAX      64u
#define URL_MAX          1024u
#define HOST_MAX         255u
#define ERR_VALUE_MAX    64u /* longest quoted value in an error message */
#define ERR_VALUE_BUFLEN (ERR_VALUE_MAX * 4 + 4)

#define KIB (UINT64_C(1) << 10)
#define MIB (UINT64_C(1) << 20)
#define GIB (UINT64_C(1) << 30)

enum key_type {
    KT_STRING,  /* non-empty text */
    KT_SECRET,  /* text, empty unsets, never shown */
    KT_ENUM,    /* one of choices */
    KT_UINT,    /* integer in [min, max] */
    KT_SIZE,    /* integer with K/M/G suffix in [min, max] */
    KT_ORIGINS, /* comma-separated list, empty unsets */
    KT_URL,     /* database URL, empty unsets, password never shown */
    KT_BOOL,    /* true/false (also on/off, yes/no, 1/0), stored as uint32_t 0/1 */
    KT_CIDRS,   /* comma-separated IPv4/IPv6 addresses or CIDR ranges, empty unsets */
};

/* KT_STRING flag: no spaces allowed (host names). */
#define KF_NOSPACE 1u

struct key_def {
    const char *section;
    const char *name;
    const char *env; /* environment variable, or NULL */
    enum key_type type;
    size_t offset; /* of the field in arq_config_t */
    size_t width;  /* KT_UINT/KT_SIZE: sizeof the field */
    unsigned flags;
    uint64_t min, max;          /* KT_UINT/KT_SIZE: range; KT_STRING: max length (0: STRING_MAX) */
    const char *const *choices; /* KT_ENUM, NULL-terminated */
    const char *choices_text;   /* KT_ENUM, for messages */
};

static const char *const log_levels[] = {"debug", "info", "warn", "error", NULL};
static const char *const log_formats[] = {"logfmt", "json", NULL};
static const char *const sync_modes[] = {"full", "none", NULL};
static const char *const on_off[] = {"on", "off", NULL};
static const char *const ack_levels[] = {"local", "replicated", NULL};
static const char *const ha_roles[] = {"single", "active", "standby", NULL};

#define FIELD(f) .offset = offsetof(arq_config_t, f), .width = sizeof(((arq_config_t *)NULL)->f)

/* Order here is the order of arq_config_print(). */
static const struct key_def keys[] = {
    {"server", "host", "API_HOST", KT_STRING, FIELD(host), .flags = KF_NOSPACE, .max = HOST_MAX},
    {"server", "port", "API_PORT", KT_UINT, FIELD(port), .min = 0, .max = 65535},
    {"server", "data_dir", "ARQ_DATA_DIR", KT_STRING, FIELD(data_dir)},
    {"server", "log_level", "LOG_LEVEL", KT_ENUM, FIELD(log_level), .choices = log_levels,
     .choices_text = "debug, info, warn, error"},
    {"server", "log_format", "ARQ_LOG_FORMAT", KT_ENUM, FIELD(log_format), .choices = log_formats,
     .choices_text = "logfmt, json"},
    {"server", "max_connections", NULL, KT_UINT, FIELD(max_connections), .min = 1, .max = 1000000},
    {"server", "handshake_timeout_ms", NULL, KT_UINT, FIELD(handshake_timeout_ms), .min = 1,
     .max = 600000},
    {"server", "hello_timeout_ms", NULL, KT_UINT, FIELD(hello_timeout_ms), .min = 1, .max = 600000},
    {"server", "max_header_bytes", NULL, KT_SIZE, FIELD(max_header_bytes), .min = KIB, .max = MIB},
    {"server", "ping_interval_ms", NULL, KT_UINT, FIELD(ping_interval_ms), .min = 10,
     .max = 3600000},
    {"server", "pong_timeout_ms", NULL, KT_UINT, FIELD(pong_timeout_ms), .min = 10, .max = 3600000},
    {"server", "session_ttl_s", NULL, KT_UINT, FIELD(session_ttl_s), .min = 1, .max = 365 * 86400},
    {"server", "trusted_proxies", "ARQ_TRUSTED_PROXIES", KT_CIDRS, FIELD(trusted_proxies)},
    {"server", "monitor_allow", NULL, KT_CIDRS, FIELD(monitor_allow)},
    {"server", "monitor_token", "ARQ_MONITOR_TOKEN", KT_SECRET, FIELD(monitor_token)},
    {"auth", "secret_key", "SECRET_KEY", KT_SECRET, FIELD(secret_key)},
    {"auth", "previous_secret_key", "SECRET_KEY_PREVIOUS", KT_SECRET, FIELD(previous_secret_key)},
    {"auth", "anonymous", "ARQ_ANONYMOUS", KT_BOOL, FIELD(anonymous)},
    {"auth", "api_key", "ARQ_API_KEY", KT_SECRET, FIELD(api_key)},
    {"auth", "api_open", NULL, KT_BOOL, FIELD(api_open)},
    {"auth", "origins", "ARQ_ORIGINS", KT_ORIGINS, FIELD(origins)},
    {"server", "hosts", "ARQ_HOSTS", KT_ORIGINS, FIELD(hosts)},
    {"auth", "expiry_grace_s", NULL, KT_UINT, FIELD(expiry_grace_s), .min = 0, .max = 3600},
    {"limits", "max_message_bytes", NULL, KT_SIZE, FIELD(max_message_bytes), .min = 1,
     .max = 256 * MIB},
    {"limits", "max_frame_bytes", NULL, KT_SIZE, FIELD(max_frame_bytes), .min = KIB,
     .max = 256 * MIB + 64 * KIB},
    {"limits", "max_fragments", NULL, KT_UINT, FIELD(max_fragments), .min = 1, .max = 65536},
    {"limits", "max_connections_per_address", NULL, KT_UINT, FIELD(max_conns_per_addr), .min = 0,
     .max = 1000000},
    {"limits", "connection_rate", NULL, KT_UINT, FIELD(conn_rate), .min = 0, .max = 1000000},
    {"limits", "connection_burst", NULL, KT_UINT, FIELD(conn_burst), .min = 0, .max = 1000000},
    {"limits", "max_subscriptions", NULL, KT_UINT, FIELD(max_subscriptions), .min = 1,
     .max = 65536},
    {"limits", "max_inflight", NULL, KT_UINT, FIELD(max_inflight), .min = 1, .max = 1048576},
    {"limits", "tail_cache_bytes", NULL, KT_SIZE, FIELD(tail_cache_bytes), .min = 0,
     .max = 1024 * GIB},
    {"limits", "stream_idle_s", NULL, KT_UINT, FIELD(stream_idle_s), .min = 1, .max = 86400},
    {"limits", "max_sessions_per_owner", NULL, KT_UINT, FIELD(max_sessions_per_owner), .min = 0,
     .max = 10000000},
    {"limits", "max_sessions_per_address", NULL, KT_UINT, FIELD(max_sessions_per_addr), .min = 0,
     .max = 10000000},
    {"limits", "session_rate", NULL, KT_UINT, FIELD(session_rate), .min = 0, .max = 1000000},
    {"limits", "session_burst", NULL, KT_UINT, FIELD(session_burst), .min = 0, .max = 1000000},
    {"limits", "max_output_bytes", NULL, KT_SIZE, FIELD(max_output_bytes), .min = 64 * KIB,
     .max = GIB},
    {"wal", "sync", "ARQ_SYNC", KT_ENUM, FIELD(sync), .choices = sync_modes,
     .choices_text = "full, none"},
    {"wal", "map_size_max", NULL, KT_SIZE, FIELD(map_size_max), .min = MIB, .max = 16384 * GIB},
    {"wal", "retain_age_s", NULL, KT_UINT, FIELD(retain_age_s), .min = 0, .max = 3650u * 86400},
    {"wal", "retain_bytes", NULL, KT_SIZE, FIELD(retain_bytes), .min = 0, .max = 16384 * GIB},
    {"wal", "retain_every_ms", NULL, KT_UINT, FIELD(retain_every_ms), .min = 10, .max = 3600000},
    {"wal", "batch_max_msgs", NULL, KT_UINT, FIELD(batch_max_msgs), .min = 1, .max = 1048576},
    {"wal", "batch_wait_us", NULL, KT_UINT, FIELD(batch_wait_us), .min = 0, .max = 1000000},
    {"wal", "batch_wait_msgs", NULL, KT_UINT, FIELD(batch_wait_msgs), .min = 0, .max = 1048576},
    {"wal", "journal", NULL, KT_ENUM, FIELD(journal), .choices = on_off, .choices_text = "on, off"},
    {"wal", "apply_us", NULL, KT_UINT, FIELD(apply_us), .min = 100, .max = 1000000},
    {"wal", "apply_idle_us", NULL, KT_UINT, FIELD(apply_idle_us), .min = 10, .max = 1000000},
    {"wal", "journal_max", NULL, KT_SIZE, FIELD(journal_max), .min = 2 * MIB, .max = GIB},
    {"wal", "ack", "ARQ_ACK", KT_ENUM, FIELD(ack), .choices = ack_levels,
     .choices_text = "local, replicated"},
    {"wal", "ack_timeout_ms", NULL, KT_UINT, FIELD(ack_timeout_ms), .min = 10, .max = 600000},
    {"database", "url", "DATABASE_URL", KT_URL, FIELD(database_url)},
    {"database", "batch_rows", NULL, KT_UINT, FIELD(sync_batch_rows), .min = 1, .max = 100000},
    {"database", "batch_wait_ms", NULL, KT_UINT, FIELD(sync_batch_wait_ms), .min = 1, .max = 60000},
    {"ha", "role", "ARQ_HA_ROLE", KT_ENUM, FIELD(ha_role), .choices = ha_roles,
     .choices_text = "single, active, standby"},
    {"ha", "node", "ARQ_HA_NODE", KT_STRING, FIELD(ha_node), .flags = KF_NOSPACE, .max = 200},
    {"ha", "lease_ms", "ARQ_HA_LEASE_MS", KT_UINT, FIELD(lease_ms), .min = 500, .max = 600000},
    {"ha", "rebuild_tail", NULL, KT_UINT, FIELD(rebuild_tail), .min = 0, .max = 4000000000u},
};

#define N_KEYS (sizeof(keys) / sizeof(keys[0]))

static const char *const sections[] = {"server", "auth", "limits", "wal", "database", "ha"};

/* ---- error messages ---- */

static void seterr(char *errbuf, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void seterr(char *errbuf, size_t errlen, const char *fmt, ...)
{
    va_list ap;

    if (errbuf == NULL || errlen == 0)
        return;
    va_start(ap, fmt);
    (void)vsnprintf(errbuf, errlen, fmt, ap);
    va_end(ap);
}

/* Copy s[0..len) into dst (ERR_VALUE_BUFLEN bytes) for quoting in a message:
 * non-printable bytes as \xHH, quote and backslash escaped, cut after
 * ERR_VALUE_MAX input bytes with "...". */
static void quote_n(char *dst, const char *s, size_t len)
{
    static const char hex[] = "0123456789abcdef";
    size_t o = 0;
    size_t n = len < ERR_VALUE_MAX ? len : ERR_VALUE_MAX;

    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '\'' || c == '\\') {
            dst[o++] = '\\';
            dst[o++] = (char)c;
        } else if (c < 0x20 || c > 0x7e) {
            dst[o++] = '\\';
            dst[o++] = 'x';
            dst[o++] = hex[c >> 4];
            dst[o++] = hex[c & 15];
        } else {
            dst[o++] = (char)c;
        }
    }
    if (n < len) {
        memcpy(dst + o, "...", 3);
        o += 3;
    }
    dst[o] = '\0';
}

static void quote(char *dst, const char *s)
{
    quote_n(dst, s, strlen(s));
}

/* Format a byte count for a message: with the largest exact suffix. */
static void format_size(char *dst, size_t dstlen, uint64_t v)
{
    if (v != 0 && v % GIB == 0)
        (void)snprintf(dst, dstlen, "%" PRIu64 "G", v / GIB);
    else if (v != 0 && v % MIB == 0)
        (void)snprintf(dst, dstlen, "%" PRIu64 "M", v / MIB);
    else if (v != 0 && v % KIB == 0)
        (void)snprintf(dst, dstlen, "%" PRIu64 "K", v / KIB);
    else
        (void)snprintf(dst, dstlen, "%" PRIu64, v);
}

/* ---- database URL ---- */

/*
 * The parts of a database URL that must not be shown: the password (between
 * the first ':' of the user info and the last '@'; without an '@', a
 * non-numeric "port" is taken for a password, as in "mysql://user:secret")
 * and any query string. Sets [*ret_pw, *ret_pw_end) (empty when there is no
 * password) and *ret_query (strlen(url) when there is no query).
 */
static void url_secret_spans(const char *url, size_t *ret_pw, size_t *ret_pw_end, size_t *ret_query)
{
    size_t len = strlen(url);
    size_t rest = strspn(url, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+.-");
    size_t query = len;
    size_t at = SIZE_MAX;
    size_t pw = 0, pw_end = 0;

    /* Only a "scheme://" at the start counts: "u:pw@h/x://y" has none. */
    rest = rest > 0 && strncmp(url + rest, "://", 3) == 0 ? rest + 3 : 0;
    for (size_t i = rest; i < len; i++) {
        if (url[i] == '@')
            at = i;
    }
    /* A '?' after the user info starts the query (a password may hold '?'). */
    for (size_t i = at == SIZE_MAX ? rest : at; i < len; i++) {
        if (url[i] == '?') {
            query = i;
            break;
        }
    }
    if (at != SIZE_MAX) {
        const char *colon = memchr(url + rest, ':', at - rest);
        if (colon != NULL) {
            pw = (size_t)(colon - url) + 1;
            pw_end = at;
        }
    } else {
        const char *colon = memchr(url + rest, ':', query - rest);
        if (colon != NULL) {
            size_t p = (size_t)(colon - url) + 1;
            size_t e = p;
            bool digits = true;
            while (e < query && url[e] != '/') {
                if (!isdigit((unsigned char)url[e]))
                    digits = false;
                e++;
            }
            if (!digits) {
                pw = p;
                pw_end = e;
            }
        }
    }
    *ret_pw = pw;
    *ret_pw_end = pw_end;
    *ret_query = query;
}

/* The URL with its password and query shown as "***"; malloc'd or NULL. */
static char *url_masked(const char *url)
{
    size_t pw, pw_end, query;
    size_t len = strlen(url);
    char *out;
    size_t o = 0;

    url_secret_spans(url, &pw, &pw_end, &query);
    out = malloc(len + 8);
    if (out == NULL)
        return NULL;
    if (pw != 0) {
        memcpy(out, url, pw);
        o = pw;
        memcpy(out + o, "***", 3);
        o += 3;
        memcpy(out + o, url + pw_end, query - pw_end);
        o += query - pw_end;
    } else {
        memcpy(out, url, query);
        o = query;
    }
    if (query < len) {
        memcpy(out + o, "?***", 4);
        o += 4;
    }
    out[o] = '\0';
    return out;
}

/*
 * Check a database URL and return it normalized to the "mysql://" scheme
 * (malloc'd) in *ret, or return a static reason.
 */
static const char *url_check(const char *url, char **ret)
{
    static const char *const fmt_hint = "expected mysql://user:password@host[:port][/database]";
    const char *rest;
    const char *at = NULL;
    const char *host, *p;
    size_t len = strlen(url);
    char *out;

    if (len > URL_MAX)
        return "longer than 1024 bytes";
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)url[i];
        if (c <= 0x20 || c >= 0x7f)
            return "contains a space, control or non-ASCII character";
    }
    if (strncasecmp(url, "mysql://", 8) == 0) {
        rest = url + 8;
    } else if (strncasecmp(url, "mysql+", 6) == 0) {
        rest = strstr(url, "://");
        if (rest == NULL)
            return fmt_hint;
        for (p = url + 6; p < rest; p++) {
            if (!isalnum((unsigned char)*p) && *p != '_')
                return fmt_hint;
        }
        rest += 3;
    } else {
        return fmt_hint;
    }
    for (p = rest; *p != '\0'; p++) {
        if (*p == '@')
            at = p;
    }
    if (at != NULL) {
        if (at == rest || *rest == ':')
            return "missing user name";
        host = at + 1;
    } else {
        host = rest;
    }
    p = host;
    if (*p == '[') {
        while (*p != '\0' && *p != ']')
            p++;
        if (*p != ']' || p == host + 1)
            return "bad IPv6 address";
        p++;
    } else {
        while (*p != '\0' && *p != ':' && *p != '/' && *p != '?')
            p++;
    }
    if (p == host)
        return "missing host";
    if ((size_t)(p - host) > HOST_MAX)
        return "host name too long";
    if (*p == ':') {
        uint32_t port = 0;
        const char *d = ++p;
        while (isdigit((unsigned char)*p) && port <= 65535) {
            port = port * 10 + (uint32_t)(*p - '0');
            p++;
        }
        if (p == d && at == NULL)
            return fmt_hint; /* "mysql://user:password" without a host */
        if (p == d || port == 0 || port > 65535 || (*p != '\0' && *p != '/' && *p != '?'))
            return "port must be an integer in 1..65535";
    }
    if (*p == '/') {
        p++;
        while (*p != '\0' && *p != '/' && *p != '?')
            p++;
        if (*p == '/')
            return "database name contains '/'";
    }
    /* Options after '?' (socket=, timeouts, tls=) are checked by the sync
     * module's parser when arqd starts (sync/url.c). */
    if (*p != '\0' && *p != '?')
        return fmt_hint;

    out = malloc(8 + strlen(rest) + 1);
    if (out == NULL)
        return "out of memory";
    memcpy(out, "mysql://", 8);
    memcpy(out + 8, rest, strlen(rest) + 1);
    *ret = out;
    return NULL;
}

/* ---- value parsing ---- */

/* Decimal digits only, at least one, no overflow. *end gets the first
 * non-digit. */
static int parse_digits(const char *s, uint64_t *ret, const char **end)
{
    uint64_t v = 0;
    const char *p = s;

    if (!isdigit((unsigned char)*p))
        return -1;
    for (; isdigit((unsigned char)*p); p++) {
        unsigned d = (unsigned)(*p - '0');
        if (v > (UINT64_MAX - d) / 10)
            return -1;
        v = v * 10 + d;
    }
    *ret = v;
    *end = p;
    return 0;
}

static int parse_uint(const char *s, uint64_t *ret)
{
    const char *end;
    uint64_t v;

    if (parse_digits(s, &v, &end) != 0 || *end != '\0')
        return -1;
    *ret = v;
    return 0;
}

static int parse_size(const char *s, uint64_t *ret)
{
    const char *end;
    uint64_t v, mult = 1;

    if (parse_digits(s, &v, &end) != 0)
        return -1;
    switch (*end) {
    case '\0':
        break;
    case 'k':
    case 'K':
        mult = KIB;
        break;
    case 'm':
    case 'M':
        mult = MIB;
        break;
    case 'g':
    case 'G':
        mult = GIB;
        break;
    default:
        return -1;
    }
    if (mult != 1 && end[1] != '\0')
        return -1;
    if (v > UINT64_MAX / mult)
        return -1;
    *ret = v * mult;
    return 0;
}

static bool has_control(const char *s, bool nospace)
{
    for (; *s != '\0'; s++) {
        unsigned char c = (unsigned char)*s;
        if (c < 0x20 || c == 0x7f || (nospace && c == ' '))
            return true;
    }
    return false;
}

/* A KT_ORIGINS key's list (char **) and, right after it, its count
 * (size_t): origins/n_origins, hosts/n_hosts. */
_Static_assert(offsetof(arq_config_t, n_origins) ==
                   offsetof(arq_config_t, origins) + sizeof(char **),
               "n_origins follows origins");
_Static_assert(offsetof(arq_config_t, n_hosts) == offsetof(arq_config_t, hosts) + sizeof(char **),
               "n_hosts follows hosts");

static char ***list_v(arq_config_t *cfg, const struct key_def *k)
{
    return (char ***)(void *)((char *)cfg + k->offset);
}

static size_t *list_n(arq_config_t *cfg, const struct key_def *k)
{
    return (size_t *)(void *)((char *)cfg + k->offset + sizeof(char **));
}

static void free_origins(char **list, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free(list[i]);
    free(list);
}

/* Split a comma-separated origin list. Returns NULL on success (*ret_list
 * NULL for an empty value) or a static reason. */
static const char *origins_parse(const char *value, char ***ret_list, size_t *ret_n)
{
    char **list = NULL;
    size_t n = 0;
    const char *p = value;

    while (*p == ' ' || *p == '\t')
        p++;
    if (*p == '\0') {
        *ret_list = NULL;
        *ret_n = 0;
        return NULL;
    }
    list = calloc(ORIGINS_MAX, sizeof(*list));
    if (list == NULL)
        return "out of memory";
    for (;;) {
        const char *start, *end, *next;

        while (*p == ' ' || *p == '\t')
            p++;
        start = p;
        while (*p != '\0' && *p != ',')
            p++;
        next = p;
        end = p;
        while (end > start && (end[-1] == ' ' || end[-1] == '\t'))
            end--;
        if (end == start)
            goto fail_empty;
        if ((size_t)(end - start) > ORIGIN_MAX)
            goto fail_long;
        for (const char *c = start; c < end; c++) {
            if ((unsigned char)*c <= 0x20 || (unsigned char)*c == 0x7f)
                goto fail_char;
        }
        if (n == ORIGINS_MAX)
            goto fail_many;
        list[n] = strndup(start, (size_t)(end - start));
        if (list[n] == NULL)
            goto fail_nomem;
        n++;
        if (*next == '\0')
            break;
        p = next + 1;
    }
    *ret_list = list;
    *ret_n = n;
    return NULL;

fail_empty:
    free_origins(list, n);
    return "empty origin in the list";
fail_long:
    free_origins(list, n);
    return "an origin is longer than 255 bytes";
fail_char:
    free_origins(list, n);
    return "an origin contains a space or control character";
fail_many:
    free_origins(list, n);
    return "more than 64 origins";
fail_nomem:
    free_origins(list, n);
    return "out of memory";
}

static uint64_t *field_u64(arq_config_t *cfg, const struct key_def *k)
{
    return (uint64_t *)(void *)((char *)cfg + k->offset);
}

static uint32_t *field_u32(arq_config_t *cfg, const struct key_def *k)
{
    return (uint32_t *)(void *)((char *)cfg + k->offset);
}

static uint16_t *field_u16(arq_config_t *cfg, const struct key_def *k)
{
    return (uint16_t *)(void *)((char *)cfg + k->offset);
}

static char **field_str(arq_config_t *cfg, const struct key_def *k)
{
    return (char **)(void *)((char *)cfg + k->offset);
}

/* KT_CIDRS: the list pointer, and its length right after it in the struct. */
static char ***field_list(arq_config_t *cfg, const struct key_def *k)
{
    return (char ***)(void *)((char *)cfg + k->offset);
}

static size_t *field_list_n(arq_config_t *cfg, const struct key_def *k)
{
    return (size_t *)(void *)((char *)cfg + k->offset + sizeof(char **));
}

static uint64_t get_uint(const arq_config_t *cfg, const struct key_def *k)
{
    const char *base = (const char *)cfg + k->offset;

    switch (k->width) {
    case sizeof(uint16_t):
        return *(const uint16_t *)(const void *)base;
    case sizeof(uint32_t):
        return *(const uint32_t *)(const void *)base;
    default:
        return *(const uint64_t *)(const void *)base;
    }
}

static void put_string(arq_config_t *cfg, const struct key_def *k, char *v)
{
    char **f = field_str(cfg, k);

    free(*f);
    *f = v;
}

/*
 * Set key k from value. where names the source for messages ("line 3:
 * server.port"). On failure returns -1 with errbuf set and leaves the field
 * as it was.
 */
static int set_value(arq_config_t *cfg, const struct key_def *k, const char *value,
                     const char *where, char *errbuf, size_t errlen)
{
    char q[ERR_VALUE_BUFLEN];
    uint64_t v;
    char *s;

    switch (k->type) {
    case KT_UINT:
    case KT_SIZE: {
        int rc = k->type == KT_SIZE ? parse_size(value, &v) : parse_uint(value, &v);
        if (rc != 0 || v < k->min || v > k->max) {
            char lo[32], hi[32];
            quote(q, value);
            if (k->type == KT_SIZE) {
                format_size(lo, sizeof(lo), k->min);
                format_size(hi, sizeof(hi), k->max);
                seterr(errbuf, errlen,
                       "%s: invalid value '%s': expected a size in %s..%s bytes (suffix K, M "
                       "or G allowed)",
                       where, q, lo, hi);
            } else {
                seterr(errbuf, errlen,
                       "%s: invalid value '%s': expected an integer in %" PRIu64 "..%" PRIu64,
                       where, q, k->min, k->max);
            }
            return -1;
        }
        if (k->width == sizeof(uint16_t))
            *field_u16(cfg, k) = (uint16_t)v;
        else if (k->width == sizeof(uint32_t))
            *field_u32(cfg, k) = (uint32_t)v;
        else
            *field_u64(cfg, k) = v;
        return 0;
    }
    case KT_ENUM:
        for (size_t i = 0; k->choices[i] != NULL; i++) {
            if (strcasecmp(value, k->choices[i]) == 0) {
                s = strdup(k->choices[i]);
                if (s == NULL)
                    goto nomem;
                put_string(cfg, k, s);
                return 0;
            }
        }
        quote(q, value);
        seterr(errbuf, errlen, "%s: invalid value '%s': expected one of %s", where, q,
               k->choices_text);
        return -1;
    case KT_STRING:
        if (value[0] == '\0') {
            seterr(errbuf, errlen, "%s: invalid value '': must not be empty", where);
            return -1;
        }
        if (strlen(value) > (k->max != 0 ? k->max : STRING_MAX)) {
            quote(q, value);
            seterr(errbuf, errlen, "%s: invalid value '%s': longer than %" PRIu64 " bytes", where,
                   q, k->max != 0 ? k->max : (uint64_t)STRING_MAX);
            return -1;
        }
        if (has_control(value, (k->flags & KF_NOSPACE) != 0)) {
            quote(q, value);
            seterr(errbuf, errlen, "%s: invalid value '%s': contains a %scontrol character", where,
                   q, (k->flags & KF_NOSPACE) != 0 ? "space or " : "");
            return -1;
        }
        s = strdup(value);
        if (s == NULL)
            goto nomem;
        put_string(cfg, k, s);
        return 0;
    case KT_SECRET:
        /* The value is never quoted: it may be (part of) the secret. */
        if (value[0] == '\0') {
            put_string(cfg, k, NULL);
            return 0;
        }
        if (strlen(value) > STRING_MAX) {
            seterr(errbuf, errlen, "%s: invalid value (secret, not shown): longer than %u bytes",
                   where, STRING_MAX);
            return -1;
        }
        if (has_control(value, false)) {
            seterr(errbuf, errlen,
                   "%s: invalid value (secret, not shown): contains a control character", where);
            return -1;
        }
        s = strdup(value);
        if (s == NULL)
            goto nomem;
        put_string(cfg, k, s);
        return 0;
    case KT_ORIGINS: {
        char **list;
        size_t n;
        const char *why = origins_parse(value, &list, &n);
        if (why != NULL) {
            quote(q, value);
            seterr(errbuf, errlen, "%s: invalid value '%s': %s", where, q, why);
            return -1;
        }
        free_origins(*list_v(cfg, k), *list_n(cfg, k));
        *list_v(cfg, k) = list;
        *list_n(cfg, k) = n;
        return 0;
    }
    case KT_BOOL: {
        static const char *const yes[] = {"true", "on", "yes", "1"};
        static const char *const no[] = {"false", "off", "no", "0"};
        for (size_t i = 0; i < 4; i++) {
            if (strcasecmp(value, yes[i]) == 0 || strcasecmp(value, no[i]) == 0) {
                *field_u32(cfg, k) = strcasecmp(value, yes[i]) == 0;
                return 0;
            }
        }
        quote(q, value);
        seterr(errbuf, errlen, "%s: invalid value '%s': expected true or false", where, q);
        return -1;
    }
    case KT_CIDRS: {
        char **list;
        size_t n;
        const char *why = origins_parse(value, &list, &n);
        for (size_t i = 0; why == NULL && i < n; i++) {
            api_cidr_t cidr;
            if (api_cidr_parse(list[i], &cidr, &why) != 0) {
                quote(q, list[i]);
                seterr(errbuf, errlen, "%s: invalid range '%s': %s", where, q, why);
                free_origins(list, n);
                return -1;
            }
        }
        if (why != NULL) {
            quote(q, value);
            seterr(errbuf, errlen, "%s: invalid value '%s': %s", where, q,
                   strstr(why, "origin") ? "expected a comma-separated list of CIDR ranges" : why);
            return -1;
        }
        char ***fl = field_list(cfg, k);
        free_origins(*fl, *field_list_n(cfg, k));
        *fl = list;
        *field_list_n(cfg, k) = n;
        return 0;
    }
    case KT_URL: {
        const char *why;
        char *masked;
        if (value[0] == '\0') {
            put_string(cfg, k, NULL);
            return 0;
        }
        s = NULL;
        why = url_check(value, &s);
        if (why == NULL) {
            put_string(cfg, k, s);
            return 0;
        }
        masked = url_masked(value);
        if (masked == NULL)
            goto nomem;
        quote(q, masked);
        free(masked);
        seterr(errbuf, errlen, "%s: invalid value '%s': %s", where, q, why);
        return -1;
    }
    }
    seterr(errbuf, errlen, "%s: internal error: unknown key type", where);
    return -1;

nomem:
    seterr(errbuf, errlen, "%s: out of memory", where);
    return -1;
}

static const struct key_def *key_find(const char *section, const char *name)
{
    for (size_t i = 0; i < N_KEYS; i++) {
        if (strcmp(keys[i].section, section) == 0 && strcmp(keys[i].name, name) == 0)
            return &keys[i];
    }
    return NULL;
}

static bool section_known(const char *name, size_t len)
{
    for (size_t i = 0; i < sizeof(sections) / sizeof(sections[0]); i++) {
        if (strlen(sections[i]) == len && memcmp(sections[i], name, len) == 0)
            return true;
    }
    return false;
}

/* ---- public API ---- */

int arq_config_defaults(arq_config_t *cfg)
{
    memset(cfg, 0, sizeof(*cfg));
    cfg->host = strdup("127.0.0.1");
    cfg->port = 8000;
    cfg->data_dir = strdup("./data");
    cfg->log_level = strdup("info");
    cfg->log_format = strdup("logfmt");
    cfg->max_connections = 10000;
    cfg->handshake_timeout_ms = 5000;
    cfg->max_header_bytes = 8192;
    cfg->ping_interval_ms = 20000;
    cfg->pong_timeout_ms = 10000;
    cfg->session_ttl_s = 86400;
    cfg->expiry_grace_s = 10;
    cfg->monitor_allow = calloc(2, sizeof(char *));
    if (cfg->monitor_allow != NULL) {
        cfg->monitor_allow[0] = strdup("127.0.0.0/8");
        cfg->monitor_allow[1] = strdup("::1");
        cfg->n_monitor_allow = 2;
    }
    cfg->sync_batch_rows = 1000;
    cfg->sync_batch_wait_ms = 20;
    cfg->max_message_bytes = 1048576;
    cfg->max_frame_bytes = 1048576 + 65536;
    cfg->max_subscriptions = 256;
    cfg->max_fragments = 128;
    cfg->stream_idle_s = 60;
    cfg->max_sessions_per_owner = 100;
    cfg->max_sessions_per_addr = 1000;
    cfg->session_rate = 100;
    cfg->session_burst = 1000;
    cfg->hello_timeout_ms = 10000;
    cfg->max_conns_per_addr = 1000;
    cfg->conn_rate = 200;
    cfg->conn_burst = 1000;
    cfg->max_inflight = 1024;
    cfg->max_output_bytes = 4 * 1048576;
    cfg->sync = strdup("full");
    cfg->map_size_max = 16 * GIB;
    cfg->retain_age_s = 7 * 86400;
    cfg->retain_bytes = 0; /* 3/4 of map_size_max */
    cfg->retain_every_ms = 5000;
    cfg->batch_max_msgs = 8192;
    cfg->batch_wait_us = 200;
    cfg->batch_wait_msgs = 16;
    cfg->journal = strdup("on");
    cfg->apply_us = 10000;
    cfg->apply_idle_us = 1000;
    cfg->journal_max = 64 * MIB;
    cfg->ack = strdup("local");
    cfg->ack_timeout_ms = 5000;
    cfg->ha_role = strdup("single");
    char hn[256] = "";
    if (gethostname(hn, sizeof(hn) - 1) != 0 || !hn[0])
        snprintf(hn, sizeof(hn), "arqd");
    cfg->ha_node = strdup(hn);
    cfg->lease_ms = 5000;
    cfg->rebuild_tail = 100000;
    if (cfg->ha_role == NULL || cfg->ha_node == NULL || cfg->ack == NULL || cfg->host == NULL ||
        cfg->data_dir == NULL || cfg->log_level == NULL || cfg->log_format == NULL ||
        cfg->sync == NULL || cfg->journal == NULL || cfg->monitor_allow == NULL ||
        cfg->monitor_allow[0] == NULL || cfg->monitor_allow[1] == NULL) {
        arq_config_free(cfg);
        return -1;
    }
    return 0;
}

int arq_config_set(arq_config_t *cfg, const char *section, const char *key, const char *value,
                   char *errbuf, size_t errlen)
{
    char qs[ERR_VALUE_BUFLEN], qk[ERR_VALUE_BUFLEN];
    char where[128];
    const struct key_def *k;

    if (section == NULL || key == NULL || (k = key_find(section, key)) == NULL) {
        quote(qs, section != NULL ? section : "");
        quote(qk, key != NULL ? key : "");
        seterr(errbuf, errlen, "unknown key '%s.%s'", qs, qk);
        return -1;
    }
    (void)snprintf(where, sizeof(where), "%s.%s", k->section, k->name);
    if (value == NULL) {
        seterr(errbuf, errlen, "%s: missing value", where);
        return -1;
    }
    return set_value(cfg, k, value, where, errbuf, errlen);
}

struct ini_ctx {
    arq_config_t *cfg;
    const char *text;
    size_t len;
    size_t pos;
    int lineno;         /* of the line inih is working on */
    int fail_line;      /* 0, or the line of the first error we reported */
    int set_on[N_KEYS]; /* line where each key was set, 0 if not */
    char *errbuf;
    size_t errlen;
};

static void ini_fail(struct ini_ctx *c)
{
    if (c->fail_line == 0)
        c->fail_line = c->lineno;
}

/* inih line reader: one line per call, so c->lineno is the line the
 * handler's key comes from. Rejects what inih would misread. */
static char *ini_read_line(char *str, int num, void *stream)
{
    struct ini_ctx *c = stream;
    const char *line, *nl, *p, *end;
    size_t linelen, max;

    if (c->fail_line != 0 || c->pos >= c->len || num < 4)
        return NULL;
    line = c->text + c->pos;
    nl = memchr(line, '\n', c->len - c->pos);
    linelen = nl != NULL ? (size_t)(nl - line) : c->len - c->pos;
    c->pos += linelen + (nl != NULL ? 1 : 0);
    c->lineno++;

    max = (size_t)num - 3 < CONFIG_LINE_MAX ? (size_t)num - 3 : CONFIG_LINE_MAX;
    if (linelen > max) {
        seterr(c->errbuf, c->errlen, "line %d: longer than %zu bytes", c->lineno, max);
        ini_fail(c);
        return NULL;
    }
    if (memchr(line, '\0', linelen) != NULL) {
        seterr(c->errbuf, c->errlen, "line %d: contains a NUL byte", c->lineno);
        ini_fail(c);
        return NULL;
    }
    p = line;
    end = line + linelen;
    if (c->lineno == 1 && linelen >= 3 && memcmp(p, "\xEF\xBB\xBF", 3) == 0)
        p += 3;
    while (p < end && isspace((unsigned char)*p))
        p++;
    if (p < end && *p == '[') {
        const char *close = memchr(p, ']', (size_t)(end - p));
        if (close != NULL && !section_known(p + 1, (size_t)(close - p - 1))) {
            char q[ERR_VALUE_BUFLEN];
            quote_n(q, p + 1, (size_t)(close - p - 1));
            seterr(c->errbuf, c->errlen, "line %d: unknown section '[%s]'", c->lineno, q);
            ini_fail(c);
            return NULL;
        }
    }
    memcpy(str, p, (size_t)(end - p));
    str[end - p] = '\0';
    return str;
}

static int ini_on_value(void *user, const char *section, const char *name, const char *value)
{
    struct ini_ctx *c = user;
    char qs[ERR_VALUE_BUFLEN], qn[ERR_VALUE_BUFLEN];
    char where[128];
    const struct key_def *k;
    size_t i;

    if (c->fail_line != 0)
        return 0;
    if (name == NULL) /* a section start (INI_CALL_HANDLER_ON_NEW_SECTION) */
        return 1;
    quote(qn, name);
    if (section == NULL || section[0] == '\0') {
        seterr(c->errbuf, c->errlen, "line %d: key '%s' outside of any section", c->lineno, qn);
        goto fail;
    }
    k = key_find(section, name);
    if (k == NULL) {
        /* The value is not shown: a misspelt secret_key may hold a secret. */
        quote(qs, section);
        seterr(c->errbuf, c->errlen, "line %d: unknown key '%s.%s'", c->lineno, qs, qn);
        goto fail;
    }
    i = (size_t)(k - keys);
    if (c->set_on[i] != 0) {
        seterr(c->errbuf, c->errlen, "line %d: duplicate key '%s.%s' (first set on line %d)",
               c->lineno, k->section, k->name, c->set_on[i]);
        goto fail;
    }
    (void)snprintf(where, sizeof(where), "line %d: %s.%s", c->lineno, k->section, k->name);
    if (value == NULL) {
        seterr(c->errbuf, c->errlen, "%s: missing value", where);
        goto fail;
    }
    if (set_value(c->cfg, k, value, where, c->errbuf, c->errlen) != 0)
        goto fail;
    c->set_on[i] = c->lineno;
    return 1;

fail:
    ini_fail(c);
    return 0;
}

int arq_config_apply_ini(arq_config_t *cfg, const char *text, size_t len, char *errbuf,
                         size_t errlen)
{
    struct ini_ctx c;
    int rc;

    if (len > CONFIG_TEXT_MAX) {
        seterr(errbuf, errlen, "configuration larger than %u bytes", CONFIG_TEXT_MAX);
        return -1;
    }
    memset(&c, 0, sizeof(c));
    c.cfg = cfg;
    c.text = text;
    c.len = text != NULL ? len : 0;
    c.errbuf = errbuf;
    c.errlen = errlen;

    rc = ini_parse_stream(ini_read_line, &c, ini_on_value, &c);
    if (rc == -2) {
        seterr(errbuf, errlen, "out of memory");
        return -1;
    }
    if (rc < 0) {
        seterr(errbuf, errlen, "cannot parse the configuration (inih error %d)", rc);
        return -1;
    }
    /* inih keeps going after a syntax error and returns the first error's
     * line; we stop at our first error. Report whichever came first. */
    if (rc > 0 && (c.fail_line == 0 || rc < c.fail_line)) {
        seterr(errbuf, errlen, "line %d: syntax error: expected '[section]' or 'key = value'", rc);
        return -1;
    }
    return c.fail_line != 0 ? -1 : 0;
}

int arq_config_apply_env(arq_config_t *cfg, char *const *envp, char *errbuf, size_t errlen)
{
    bool seen[N_KEYS] = {false};

    if (envp == NULL)
        return 0;
    for (size_t e = 0; envp[e] != NULL; e++) {
        const char *var = envp[e];
        const char *eq = strchr(var, '=');

        if (eq == NULL)
            continue;
        for (size_t i = 0; i < N_KEYS; i++) {
            const struct key_def *k = &keys[i];
            char where[128];

            if (k->env == NULL || seen[i] || strlen(k->env) != (size_t)(eq - var) ||
                memcmp(k->env, var, (size_t)(eq - var)) != 0)
                continue;
            seen[i] = true;
            (void)snprintf(where, sizeof(where), "%s (%s.%s)", k->env, k->section, k->name);
            if (set_value(cfg, k, eq + 1, where, errbuf, errlen) != 0)
                return -1;
            break;
        }
    }
    return 0;
}

/* "name = value", or "name =" for an empty value. */
static bool print_kv(FILE *f, const char *name, const char *value)
{
    if (value == NULL || value[0] == '\0')
        return fprintf(f, "%s =\n", name) > 0;
    return fprintf(f, "%s = %s\n", name, value) > 0;
}

int arq_config_print(const arq_config_t *cfg, char **ret_text)
{
    char *buf = NULL;
    size_t size = 0;
    const char *section = NULL;
    bool ok = true;
    FILE *f = open_memstream(&buf, &size);

    if (f == NULL)
        return -1;
    for (size_t i = 0; i < N_KEYS && ok; i++) {
        const struct key_def *k = &keys[i];
        const char *s = NULL;

        if (section == NULL || strcmp(section, k->section) != 0) {
            ok = fprintf(f, "%s[%s]\n", section != NULL ? "\n" : "", k->section) > 0;
            section = k->section;
            if (!ok)
                break;
        }
        if (k->type != KT_UINT && k->type != KT_SIZE && k->type != KT_ORIGINS &&
            k->type != KT_BOOL && k->type != KT_CIDRS)
            s = *(char *const *)(const void *)((const char *)cfg + k->offset);
        switch (k->type) {
        case KT_UINT:
        case KT_SIZE:
            ok = fprintf(f, "%s = %" PRIu64 "\n", k->name, get_uint(cfg, k)) > 0;
            break;
        case KT_STRING:
        case KT_ENUM:
            ok = print_kv(f, k->name, s);
            break;
        case KT_SECRET:
            ok = print_kv(f, k->name, s != NULL ? "***" : NULL);
            break;
        case KT_BOOL:
            ok = fprintf(f, "%s = %s\n", k->name, get_uint(cfg, k) ? "true" : "false") > 0;
            break;
        case KT_CIDRS: {
            arq_config_t *mc = (arq_config_t *)cfg; /* read only */
            char **l = *field_list(mc, k);
            size_t n = *field_list_n(mc, k);
            ok = fprintf(f, n > 0 ? "%s = " : "%s =", k->name) > 0;
            for (size_t j = 0; ok && j < n; j++)
                ok = fprintf(f, "%s%s", j > 0 ? "," : "", l[j]) > 0;
            ok = ok && fputc('\n', f) != EOF;
            break;
        }
        case KT_ORIGINS: {
            char *const *v = *(char *const *const *)(const void *)((const char *)cfg + k->offset);
            size_t n =
                *(const size_t *)(const void *)((const char *)cfg + k->offset + sizeof(char **));
            ok = fprintf(f, n > 0 ? "%s = " : "%s =", k->name) > 0;
            for (size_t j = 0; ok && j < n; j++)
                ok = fprintf(f, "%s%s", j > 0 ? "," : "", v[j]) > 0;
        }
            ok = ok && fputc('\n', f) != EOF;
            break;
        case KT_URL:
            if (s == NULL) {
                ok = print_kv(f, k->name, NULL);
            } else {
                char *masked = url_masked(s);
                ok = masked != NULL && print_kv(f, k->name, masked);
                free(masked);
            }
            break;
        }
    }
    if (fclose(f) != 0)
        ok = false;
    if (!ok || buf == NULL) {
        free(buf);
        return -1;
    }
    *ret_text = buf;
    return 0;
}

void arq_config_free(arq_config_t *cfg)
{
    if (cfg == NULL)
        return;
    free(cfg->host);
    free(cfg->data_dir);
    free(cfg->log_level);
    free(cfg->log_format);
    free(cfg->secret_key);
    free(cfg->api_key);
    free(cfg->previous_secret_key);
    free(cfg->monitor_token);
    free_origins(cfg->origins, cfg->n_origins);
    free_origins(cfg->hosts, cfg->n_hosts);
    if (cfg->trusted_proxies != NULL)
        free_origins(cfg->trusted_proxies, cfg->n_trusted_proxies);
    if (cfg->monitor_allow != NULL)
        free_origins(cfg->monitor_allow, cfg->n_monitor_allow);
    free(cfg->sync);
    free(cfg->journal);
    free(cfg->ack);
    free(cfg->database_url);
    free(cfg->ha_role);
    free(cfg->ha_node);
    memset(cfg, 0, sizeof(*cfg));
}

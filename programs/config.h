/*
 * config.h - arqd's configuration: defaults, then an INI file, then the
 * environment, then command-line flags (later sources win). Parsing only:
 * no I/O beyond reading the named file, no logging (errors go to errbuf).
 */
#ifndef ARQ_CONFIG_H
#define ARQ_CONFIG_H

#include <stddef.h>
#include <stdint.h>

typedef struct arq_config {
    /* [server] */
    char *host;                    /* API_HOST, default "127.0.0.1" */
    uint16_t port;                 /* API_PORT, default 8000; 0 = any free port */
    char *data_dir;                /* ARQ_DATA_DIR / --data-dir, default "./data" */
    char *log_level;               /* LOG_LEVEL: debug|info|warn|error, default "info" */
    char *log_format;              /* logfmt|json, default "logfmt" */
    uint32_t max_connections;      /* default 10000 */
    uint32_t handshake_timeout_ms; /* default 5000 */
    uint32_t max_header_bytes;     /* HTTP request head limit, default 8192 */
    uint32_t ping_interval_ms;     /* default 20000 */
    uint32_t pong_timeout_ms;      /* default 10000 */
    uint32_t session_ttl_s;        /* sessions kept after their last connection, default 86400 */
    char **trusted_proxies; /* ARQ_TRUSTED_PROXIES: CIDRs whose X-Forwarded-For is believed */
    size_t n_trusted_proxies;
    char **monitor_allow; /* CIDRs that may read /metrics and /health details; default loopback */
    size_t n_monitor_allow;
    char *monitor_token; /* ARQ_MONITOR_TOKEN: bearer token for /metrics and /health details */
    /* [auth] */
    char *secret_key;          /* SECRET_KEY (HS256); NULL: no tokens (see anonymous) */
    char *previous_secret_key; /* SECRET_KEY_PREVIOUS: also accepted, for key rotation */
    uint32_t anonymous;        /* ARQ_ANONYMOUS: clients without a token, full access (0/1) */
    char *api_key;             /* ARQ_API_KEY: server API key for POST /api/publish */
    uint32_t api_open;         /* the server API without a key (0/1, default 0) */
    char **origins;          /* ARQ_ORIGINS: comma-separated allow-list; NULL = same origin only */
    size_t n_origins;        /* (must follow origins) */
    char **hosts;            /* ARQ_HOSTS: Host header values served; NULL = any */
    size_t n_hosts;          /* (must follow hosts) */
    uint32_t expiry_grace_s; /* a connection outlives its token's exp by this, default 10 */
    /* [limits] */
    uint32_t max_message_bytes;  /* default 1048576 (1 MiB) payload */
    uint32_t max_frame_bytes;    /* default 1114112 (payload + 64 KiB) */
    uint32_t max_fragments;      /* frames one WebSocket message may arrive in, default 128 */
    uint32_t max_conns_per_addr; /* connections per client address at once, default 1000 */
    uint32_t conn_rate;          /* new connections per second per address, default 200 */
    uint32_t conn_burst;         /* ... and at once, default 1000 */
    uint32_t hello_timeout_ms;   /* hello after the upgrade, default 10000 */
    uint32_t max_subscriptions;  /* per connection, default 256 */
    uint32_t max_inflight;       /* unacked deliveries per subscription, default 1024 */
    uint64_t tail_cache_bytes;   /* all streams' tail caches (0: 1/32 of RAM, at most 256 MiB) */
    uint32_t stream_idle_s;      /* an idle stream without subscribers is freed, default 60 */
    uint32_t max_sessions_per_owner; /* sessions per token subject, default 100 */
    uint32_t max_sessions_per_addr;  /* sessions per anonymous address, default 1000 */
    uint32_t session_rate;           /* new sessions per second per owner, default 100 */
    uint32_t session_burst;          /* ... at once, default 1000 */
    uint32_t max_output_bytes;       /* per-connection output buffer high watermark, 4 MiB */
    /* [wal] */
    char *sync;               /* "full" (default) | "none" (UNSAFE) */
    uint64_t map_size_max;    /* default 16 GiB */
    uint32_t retain_age_s;    /* drop synced records older than this, default 7 days */
    uint64_t retain_bytes;    /* ... and while the WAL holds more (0: 3/4 of map_size_max) */
    uint32_t retain_every_ms; /* how often retention runs, default 5000 */
    uint32_t batch_max_msgs;  /* default 8192 */
    uint32_t batch_wait_us;   /* default 200 */
    uint32_t batch_wait_msgs; /* linger only while fewer are queued; default 16 (0: no limit) */
    char *journal;            /* "on" (default) | "off": group commits through <data>/journal */
    uint32_t apply_us;        /* fold the journal into LMDB at least this often, default 10000 */
    uint32_t apply_idle_us;   /* ... or after this long idle, default 1000 */
    uint64_t journal_max;     /* each journal file grows up to this, default 64 MiB */
    char *ack;                /* "local" (default) | "replicated": pubacks once MySQL has it */
    uint32_t ack_timeout_ms;  /* a replicated publish waits this long for MySQL, 5000 */
    /* [database] */
    char *database_url;          /* DATABASE_URL; NULL: WAL-only */
    uint32_t sync_batch_rows;    /* rows per MySQL sync transaction, default 1000 */
    uint32_t sync_batch_wait_ms; /* idle poll of the WAL by the sync thread, default 20 */
    /* [ha] (docs/ha.md) */
    char *ha_role;         /* ARQ_HA_ROLE: "single" (default) | "active" | "standby" */
    char *ha_node;         /* ARQ_HA_NODE: this node's name in the lease (default: hostname) */
    uint32_t lease_ms;     /* ARQ_HA_LEASE_MS: the lease's length, default 5000 */
    uint32_t rebuild_tail; /* offsets per stream a takeover rebuilds (0: all), 100000 */
} arq_config_t;

/* Fill *cfg with defaults (allocates the strings). */
int arq_config_defaults(arq_config_t *cfg);
/* Apply an INI document (the text, not a path). Unknown sections/keys and
 * bad values are errors naming the line. Returns 0 or -1 with errbuf set. */
int arq_config_apply_ini(arq_config_t *cfg, const char *text, size_t len, char *errbuf,
                         size_t errlen);
/* Apply the environment: envp-style array of "NAME=value" (NULL-terminated). */
int arq_config_apply_env(arq_config_t *cfg, char *const *envp, char *errbuf, size_t errlen);
/* Set one key by its INI name ("server.port", "auth.secret_key", ...). Used
 * by flags (--set section.key=value) and by the two parsers above. */
int arq_config_set(arq_config_t *cfg, const char *section, const char *key, const char *value,
                   char *errbuf, size_t errlen);
/* Write the effective configuration as INI, secrets masked as "***". */
int arq_config_print(const arq_config_t *cfg, char **ret_text);
void arq_config_free(arq_config_t *cfg);

#endif

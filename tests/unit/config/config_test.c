/*
 * config_test.c - programs/config.c: defaults, the INI document, the
 * environment and --set in their order of precedence, strict values, error
 * messages that name their source, and secrets that never show.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"

static arq_config_t cfg;
static char err[512];

static int setup(void **state)
{
    (void)state;
    err[0] = '\0';
    return arq_config_defaults(&cfg);
}

static int teardown(void **state)
{
    (void)state;
    arq_config_free(&cfg);
    return 0;
}

static int ini(const char *text)
{
    err[0] = '\0';
    return arq_config_apply_ini(&cfg, text, strlen(text), err, sizeof(err));
}

static int env1(const char *var)
{
    char *envp[] = {(char *)var, NULL};

    err[0] = '\0';
    return arq_config_apply_env(&cfg, envp, err, sizeof(err));
}

static void err_has(const char *needle)
{
    if (needle != NULL && strstr(err, needle) == NULL)
        fail_msg("error message '%s' lacks '%s'", err, needle);
}

static void err_lacks(const char *needle)
{
    if (strstr(err, needle) != NULL)
        fail_msg("error message '%s' shows '%s'", err, needle);
}

static char *print_cfg(void)
{
    char *text = NULL;

    assert_int_equal(arq_config_print(&cfg, &text), 0);
    assert_non_null(text);
    return text;
}

static void test_defaults(void **state)
{
    (void)state;
    assert_string_equal(cfg.host, "127.0.0.1");
    assert_int_equal(cfg.port, 8000);
    assert_string_equal(cfg.data_dir, "./data");
    assert_string_equal(cfg.log_level, "info");
    assert_string_equal(cfg.log_format, "logfmt");
    assert_int_equal(cfg.max_connections, 10000);
    assert_int_equal(cfg.handshake_timeout_ms, 5000);
    assert_int_equal(cfg.max_header_bytes, 8192);
    assert_int_equal(cfg.ping_interval_ms, 20000);
    assert_int_equal(cfg.pong_timeout_ms, 10000);
    assert_null(cfg.secret_key);
    assert_null(cfg.api_key);
    assert_null(cfg.origins);
    assert_int_equal(cfg.n_origins, 0);
    assert_int_equal(cfg.max_message_bytes, 1048576);
    assert_int_equal(cfg.max_frame_bytes, 1114112);
    assert_int_equal(cfg.max_subscriptions, 256);
    assert_int_equal(cfg.max_inflight, 1024);
    assert_int_equal(cfg.max_output_bytes, 4 * 1048576);
    assert_string_equal(cfg.sync, "full");
    assert_true(cfg.map_size_max == 16ull << 30);
    assert_int_equal(cfg.batch_max_msgs, 8192);
    assert_int_equal(cfg.batch_wait_us, 200);
    assert_int_equal(cfg.batch_wait_msgs, 16);
    assert_string_equal(cfg.journal, "on");
    assert_int_equal(cfg.apply_us, 10000);
    assert_int_equal(cfg.apply_idle_us, 1000);
    assert_null(cfg.database_url);
}

static const char full_ini[] = "; every key\n"
                               "[server]\n"
                               "host = 0.0.0.0\n"
                               "port = 9001\n"
                               "data_dir = /var/lib/arq\n"
                               "log_level = debug\n"
                               "log_format = json\n"
                               "max_connections = 500\n"
                               "handshake_timeout_ms = 1500\n"
                               "max_header_bytes = 16384\n"
                               "ping_interval_ms = 30000\n"
                               "pong_timeout_ms = 7000\n"
                               "\n"
                               "[auth]\n"
                               "secret_key = k3y-for-tests-0123456789abcdef\n"
                               "api_key = api-k3y-for-tests\n"
                               "origins = https://a.example, https://b.example:8443\n"
                               "\n"
                               "[limits]\n"
                               "max_message_bytes = 2097152\n"
                               "max_frame_bytes = 2162688\n"
                               "max_subscriptions = 17\n"
                               "max_inflight = 33\n"
                               "max_output_bytes = 8388608\n"
                               "\n"
                               "[wal]\n"
                               "sync = none\n"
                               "map_size_max = 2G\n"
                               "batch_max_msgs = 100\n"
                               "batch_wait_us = 250\n"
                               "batch_wait_msgs = 0\n"
                               "journal = off\n"
                               "apply_us = 5000\n"
                               "apply_idle_us = 300\n"
                               "\n"
                               "[database]\n"
                               "url = mysql://arq:pw@db.example:3307/arqdb\n"
                               "\n"
                               "[ha]\n"
                               "role = standby\n"
                               "node = arq-2\n"
                               "lease_ms = 3000\n"
                               "rebuild_tail = 0\n";

static void test_ini_every_key(void **state)
{
    (void)state;
    assert_int_equal(ini(full_ini), 0);
    assert_string_equal(cfg.host, "0.0.0.0");
    assert_int_equal(cfg.port, 9001);
    assert_string_equal(cfg.data_dir, "/var/lib/arq");
    assert_string_equal(cfg.log_level, "debug");
    assert_string_equal(cfg.log_format, "json");
    assert_int_equal(cfg.max_connections, 500);
    assert_int_equal(cfg.handshake_timeout_ms, 1500);
    assert_int_equal(cfg.max_header_bytes, 16384);
    assert_int_equal(cfg.ping_interval_ms, 30000);
    assert_int_equal(cfg.pong_timeout_ms, 7000);
    assert_string_equal(cfg.secret_key, "k3y-for-tests-0123456789abcdef");
    assert_string_equal(cfg.api_key, "api-k3y-for-tests");
    assert_int_equal(cfg.n_origins, 2);
    assert_string_equal(cfg.origins[0], "https://a.example");
    assert_string_equal(cfg.origins[1], "https://b.example:8443");
    assert_int_equal(cfg.max_message_bytes, 2097152);
    assert_int_equal(cfg.max_frame_bytes, 2162688);
    assert_int_equal(cfg.max_subscriptions, 17);
    assert_int_equal(cfg.max_inflight, 33);
    assert_int_equal(cfg.max_output_bytes, 8388608);
    assert_string_equal(cfg.sync, "none");
    assert_true(cfg.map_size_max == 2ull << 30);
    assert_int_equal(cfg.batch_max_msgs, 100);
    assert_int_equal(cfg.batch_wait_us, 250);
    assert_int_equal(cfg.batch_wait_msgs, 0);
    assert_string_equal(cfg.journal, "off");
    assert_int_equal(cfg.apply_us, 5000);
    assert_int_equal(cfg.apply_idle_us, 300);
    assert_string_equal(cfg.database_url, "mysql://arq:pw@db.example:3307/arqdb");
    assert_string_equal(cfg.ha_role, "standby");
    assert_string_equal(cfg.ha_node, "arq-2");
    assert_int_equal(cfg.lease_ms, 3000);
    assert_int_equal(cfg.rebuild_tail, 0);
}

static void test_ini_syntax_forms(void **state)
{
    (void)state;
    /* BOM, CRLF, comments, indentation, "key: value", inline comment, keys
     * of one section split over two headers. */
    assert_int_equal(ini("\xEF\xBB\xBF# comment\r\n"
                         "[server]\r\n"
                         "    host = ::1 ; inline comment\r\n"
                         "    port: 7000\r\n"
                         "\t; indented comment\n"
                         "[wal]\n"
                         "sync = NONE\n"
                         "[server]\n"
                         "log_level = WARN\n"),
                     0);
    assert_string_equal(cfg.host, "::1");
    assert_int_equal(cfg.port, 7000);
    assert_string_equal(cfg.sync, "none");
    assert_string_equal(cfg.log_level, "warn");
    /* An indented line is a key of its own, not a continuation of the
     * previous value (inih's multi-line values are turned off). */
    assert_int_equal(ini("[limits]\nmax_inflight = 5\n  max_subscriptions = 6\n"), 0);
    assert_int_equal(cfg.max_inflight, 5);
    assert_int_equal(cfg.max_subscriptions, 6);
    /* Empty input and a NULL text of length 0 change nothing. */
    assert_int_equal(ini(""), 0);
    assert_int_equal(arq_config_apply_ini(&cfg, NULL, 0, err, sizeof(err)), 0);
    assert_int_equal(cfg.port, 7000);
}

static void test_env_overrides_ini(void **state)
{
    char *envp[] = {
        "PATH=/usr/bin",
        "API_HOST=10.0.0.1",
        "API_PORT=8100",
        "LOG_LEVEL=error",
        "SECRET_KEY=env-secret-value-1234",
        "DATABASE_URL=mysql://u:p@dbhost/arq",
        "ARQ_DATA_DIR=/srv/arq",
        "ARQ_API_KEY=env-api-key",
        "ARQ_ORIGINS=https://x.example",
        "ARQ_LOG_FORMAT=json",
        "ARQ_SYNC=none",
        "ARQ_PORT=1",       /* not one of ours: ignored */
        "HOST=bad host",    /* ignored */
        "NOEQUALS",         /* malformed entry: ignored */
        "API_PORT=bad",     /* a second API_PORT: the first one counts */
        "ARQ_MAX_INFLIGHT", /* ignored */
        NULL,
    };

    (void)state;
    assert_int_equal(ini("[server]\nhost = 192.168.0.1\nport = 9000\ndata_dir = /ini\n"
                         "[limits]\nmax_inflight = 7\n"),
                     0);
    assert_int_equal(arq_config_apply_env(&cfg, envp, err, sizeof(err)), 0);
    assert_string_equal(cfg.host, "10.0.0.1");
    assert_int_equal(cfg.port, 8100);
    assert_string_equal(cfg.log_level, "error");
    assert_string_equal(cfg.secret_key, "env-secret-value-1234");
    assert_string_equal(cfg.database_url, "mysql://u:p@dbhost/arq");
    assert_string_equal(cfg.data_dir, "/srv/arq");
    assert_string_equal(cfg.api_key, "env-api-key");
    assert_int_equal(cfg.n_origins, 1);
    assert_string_equal(cfg.origins[0], "https://x.example");
    assert_string_equal(cfg.log_format, "json");
    assert_string_equal(cfg.sync, "none");
    assert_int_equal(cfg.max_inflight, 7); /* no variable for it: INI stays */
    assert_int_equal(arq_config_apply_env(&cfg, NULL, err, sizeof(err)), 0);
}

static void test_env_empty_unsets_secrets(void **state)
{
    (void)state;
    assert_int_equal(ini("[auth]\nsecret_key = abc\napi_key = def\norigins = https://o\n"
                         "[database]\nurl = mysql://u@h/db\n"),
                     0);
    assert_int_equal(env1("SECRET_KEY="), 0);
    assert_null(cfg.secret_key);
    assert_int_equal(env1("ARQ_API_KEY="), 0);
    assert_null(cfg.api_key);
    assert_int_equal(env1("ARQ_ORIGINS="), 0);
    assert_null(cfg.origins);
    assert_int_equal(cfg.n_origins, 0);
    assert_int_equal(env1("DATABASE_URL="), 0);
    assert_null(cfg.database_url);
    /* An empty secret_key in the INI file is unset as well. */
    assert_int_equal(ini("[auth]\nsecret_key =\n"), 0);
    assert_null(cfg.secret_key);
}

static void test_set_overrides_env(void **state)
{
    (void)state;
    assert_int_equal(ini("[server]\nport = 9000\n"), 0);
    assert_int_equal(env1("API_PORT=9100"), 0);
    assert_int_equal(arq_config_set(&cfg, "server", "port", "9200", err, sizeof(err)), 0);
    assert_int_equal(cfg.port, 9200);
    assert_int_equal(env1("LOG_LEVEL=debug"), 0);
    assert_int_equal(arq_config_set(&cfg, "server", "log_level", "error", err, sizeof(err)), 0);
    assert_string_equal(cfg.log_level, "error");
    assert_int_equal(arq_config_set(&cfg, "wal", "map_size_max", "64M", err, sizeof(err)), 0);
    assert_true(cfg.map_size_max == 64ull << 20);
    assert_int_equal(arq_config_set(&cfg, "auth", "origins", "a,b,c", err, sizeof(err)), 0);
    assert_int_equal(cfg.n_origins, 3);
    assert_string_equal(cfg.origins[2], "c");
}

static void test_set_errors(void **state)
{
    (void)state;
    assert_int_equal(arq_config_set(&cfg, "server", "prot", "1", err, sizeof(err)), -1);
    err_has("unknown key 'server.prot'");
    assert_int_equal(arq_config_set(&cfg, "sever", "port", "1", err, sizeof(err)), -1);
    err_has("unknown key 'sever.port'");
    assert_int_equal(arq_config_set(&cfg, NULL, "port", "1", err, sizeof(err)), -1);
    assert_int_equal(arq_config_set(&cfg, "server", "port", NULL, err, sizeof(err)), -1);
    err_has("server.port: missing value");
    assert_int_equal(arq_config_set(&cfg, "server", "port", "70000", err, sizeof(err)), -1);
    err_has("server.port: invalid value '70000'");
    assert_int_equal(cfg.port, 8000); /* untouched */
    assert_int_equal(arq_config_set(&cfg, "wal", "sync", "sometimes", err, sizeof(err)), -1);
    err_has("wal.sync: invalid value 'sometimes': expected one of full, none");
    assert_string_equal(cfg.sync, "full");
    /* Port 0 is allowed: the listener takes any free port (arqd --port 0). */
    assert_int_equal(arq_config_set(&cfg, "server", "port", "0", err, sizeof(err)), 0);
    assert_int_equal(cfg.port, 0);
    /* A NULL or empty errbuf is allowed. */
    assert_int_equal(arq_config_set(&cfg, "server", "port", "x", NULL, 0), -1);
    assert_int_equal(arq_config_set(&cfg, "server", "port", "x", err, 0), -1);
}

struct bad_case {
    const char *input;
    const char *want[3];
};

/* Each INI case has its bad line on line 2. */
static const struct bad_case bad_ini[] = {
    {"[server]\nport = 65536\n", {"line 2: server.port: invalid value '65536'", "0..65535"}},
    {"[server]\nport = 65536\n", {"line 2: server.port: invalid value '65536'"}},
    {"[server]\nport = 80x\n", {"line 2: server.port: invalid value '80x'"}},
    {"[server]\nport = -1\n", {"line 2: server.port: invalid value '-1'"}},
    {"[server]\nport = +1\n", {"line 2: server.port: invalid value '+1'"}},
    {"[server]\nport = 0x50\n", {"line 2: server.port: invalid value '0x50'"}},
    {"[server]\nport =\n", {"line 2: server.port: invalid value ''"}},
    {"[server]\nport = 8 0\n", {"line 2: server.port: invalid value '8 0'"}},
    {"[server]\nmax_connections = 18446744073709551616\n",
     {"line 2: server.max_connections: invalid value '18446744073709551616'"}},
    {"[server]\nmax_connections = 0\n", {"line 2: server.max_connections", "'0'"}},
    {"[server]\nhandshake_timeout_ms = 600001\n",
     {"line 2: server.handshake_timeout_ms", "'600001'"}},
    {"[server]\nmax_header_bytes = 1023\n", {"line 2: server.max_header_bytes", "'1023'"}},
    {"[server]\nping_interval_ms = 9\n", {"line 2: server.ping_interval_ms", "'9'"}},
    {"[server]\npong_timeout_ms = 1e3\n", {"line 2: server.pong_timeout_ms", "'1e3'"}},
    {"[server]\nhost =\n", {"line 2: server.host", "must not be empty"}},
    {"[server]\nhost = a b\n", {"line 2: server.host: invalid value 'a b'"}},
    {"[server]\nhost = a\x01z\n", {"line 2: server.host: invalid value 'a\\x01z'"}},
    {"[server]\ndata_dir =\n", {"line 2: server.data_dir", "must not be empty"}},
    {"[server]\nlog_level = verbose\n",
     {"line 2: server.log_level: invalid value 'verbose'", "debug, info, warn, error"}},
    {"[server]\nlog_format = xml\n", {"line 2: server.log_format: invalid value 'xml'"}},
    {"[limits]\nmax_message_bytes = 0\n", {"line 2: limits.max_message_bytes", "'0'"}},
    {"[limits]\nmax_frame_bytes = 1T\n", {"line 2: limits.max_frame_bytes", "'1T'"}},
    {"[limits]\nmax_subscriptions = 65537\n", {"line 2: limits.max_subscriptions"}},
    {"[limits]\nmax_inflight = 1.5\n", {"line 2: limits.max_inflight", "'1.5'"}},
    {"[limits]\nmax_output_bytes = 16GB\n", {"line 2: limits.max_output_bytes", "'16GB'"}},
    {"[wal]\nsync = always\n", {"line 2: wal.sync: invalid value 'always'", "full, none"}},
    {"[wal]\nmap_size_max = 512K\n", {"line 2: wal.map_size_max: invalid value '512K'", "1M"}},
    {"[wal]\nmap_size_max = 16385G\n", {"line 2: wal.map_size_max", "16384G"}},
    {"[wal]\nbatch_max_msgs = 0\n", {"line 2: wal.batch_max_msgs"}},
    {"[wal]\nbatch_wait_us = 1000001\n", {"line 2: wal.batch_wait_us", "'1000001'"}},
    {"[wal]\nbatch_wait_msgs = -1\n", {"line 2: wal.batch_wait_msgs", "'-1'"}},
    {"[wal]\njournal = maybe\n", {"line 2: wal.journal: invalid value 'maybe'", "on, off"}},
    {"[wal]\napply_us = 99\n", {"line 2: wal.apply_us", "'99'"}},
    {"[wal]\napply_idle_us = 0\n", {"line 2: wal.apply_idle_us", "'0'"}},
    {"[auth]\norigins = a,,b\n", {"line 2: auth.origins: invalid value 'a,,b'", "empty"}},
    {"[auth]\norigins = a b\n", {"line 2: auth.origins: invalid value 'a b'"}},
    {"[database]\nurl = postgres://db/x\n", {"line 2: database.url", "'postgres://db/x'"}},
    {"[ha]\nrole = primary\n", {"line 2: ha.role", "'primary'", "single, active, standby"}},
    {"[ha]\nlease_ms = 100\n", {"line 2: ha.lease_ms", "'100'"}},
    {"[ha]\nnode = a b\n", {"line 2: ha.node"}},
    {"[database]\nurl = mysql://h:0/db\n", {"line 2: database.url", "'mysql://h:0/db'", "port"}},
    {"[database]\nurl = mysql:///db\n", {"line 2: database.url", "missing host"}},
};

static void test_invalid_ini_values(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof(bad_ini) / sizeof(bad_ini[0]); i++) {
        arq_config_t fresh;
        char *before, *after;

        before = print_cfg();
        if (ini(bad_ini[i].input) != -1)
            fail_msg("accepted: %s", bad_ini[i].input);
        for (size_t j = 0; j < 3; j++)
            err_has(bad_ini[i].want[j]);
        /* A rejected value leaves the configuration as it was. */
        after = print_cfg();
        assert_string_equal(before, after);
        free(before);
        free(after);
        assert_int_equal(arq_config_defaults(&fresh), 0);
        arq_config_free(&fresh);
    }
}

static const struct bad_case bad_env[] = {
    {"API_PORT=abc", {"API_PORT (server.port): invalid value 'abc'", "0..65535"}},
    {"API_PORT= 80", {"API_PORT", "' 80'"}},
    {"API_PORT=80 ", {"API_PORT", "'80 '"}},
    {"API_PORT=", {"API_PORT", "''"}},
    {"API_HOST=", {"API_HOST (server.host)", "must not be empty"}},
    {"API_HOST=a\nb", {"API_HOST", "'a\\x0ab'"}},
    {"API_HOST=h2345678901234567890123456789012345678901234567890123456789012345678901234567890"
     "123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890"
     "1234567890123456789012345678901234567890123456789012345678901234567890123456789012345678",
     {"API_HOST", "longer than 255 bytes"}},
    {"LOG_LEVEL=verbose", {"LOG_LEVEL (server.log_level): invalid value 'verbose'"}},
    {"ARQ_LOG_FORMAT=xml", {"ARQ_LOG_FORMAT", "'xml'"}},
    {"ARQ_SYNC=sometimes", {"ARQ_SYNC (wal.sync)", "'sometimes'"}},
    {"ARQ_DATA_DIR=", {"ARQ_DATA_DIR", "must not be empty"}},
    {"ARQ_ORIGINS=a, ,b", {"ARQ_ORIGINS (auth.origins)", "'a, ,b'"}},
    {"DATABASE_URL=mysql://u@h:99999/db",
     {"DATABASE_URL (database.url)", "'mysql://u@h:99999/db'"}},
};

static void test_invalid_env_values(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof(bad_env) / sizeof(bad_env[0]); i++) {
        if (env1(bad_env[i].input) != -1)
            fail_msg("accepted: %s", bad_env[i].input);
        for (size_t j = 0; j < 3; j++)
            err_has(bad_env[i].want[j]);
    }
}

static void test_unknown_and_syntax(void **state)
{
    (void)state;
    assert_int_equal(ini("[server]\nport = 1\n\n[bogus]\n"), -1);
    err_has("line 4: unknown section '[bogus]'");
    assert_int_equal(ini("[server]\nbogus = 1\n"), -1);
    err_has("line 2: unknown key 'server.bogus'");
    assert_int_equal(ini("[Server]\nport = 1\n"), -1);
    err_has("line 1: unknown section '[Server]'");
    assert_int_equal(ini("[]\nport = 1\n"), -1);
    err_has("line 1: unknown section '[]'");
    assert_int_equal(ini("port = 1\n"), -1);
    err_has("line 1: key 'port' outside of any section");
    assert_int_equal(ini("[server]\nport = 1\nhost = h\nport = 2\n"), -1);
    err_has("line 4: duplicate key 'server.port' (first set on line 2)");
    assert_int_equal(ini("[server]\nport 1\n"), -1);
    err_has("line 2: syntax error");
    assert_int_equal(ini("[server\nport = 1\n"), -1);
    err_has("line 1: syntax error");
    assert_int_equal(ini("[server]\n= 5\n"), -1);
    err_has("line 2: unknown key 'server.'");
    /* The first error wins: a syntax error before a bad value... */
    assert_int_equal(ini("[server]\njunk\nport = 70000\n"), -1);
    err_has("line 2: syntax error");
    /* ...and a bad value before a syntax error. */
    assert_int_equal(ini("[server]\nport = 70000\njunk\n"), -1);
    err_has("line 2: server.port");
    /* A NUL byte. */
    assert_int_equal(arq_config_apply_ini(&cfg, "[server]\nport\0= 1\n", 17, err, sizeof(err)), -1);
    err_has("line 2: contains a NUL byte");
}

static void test_line_limit(void **state)
{
    char text[512];
    size_t n;

    (void)state;
    /* 197 bytes is the longest line inih can hold ("\r\n\0" besides). */
    n = (size_t)snprintf(text, sizeof(text), "[server]\ndata_dir = ");
    memset(text + n, 'd', 197 - 11);
    text[n + 186] = '\0';
    assert_int_equal(strlen(text) - 9, 197);
    assert_int_equal(ini(text), 0);
    assert_int_equal(strlen(cfg.data_dir), 186);
    /* 198 would be cut in two by inih: rejected. */
    text[n + 186] = 'd';
    text[n + 187] = '\0';
    assert_int_equal(ini(text), -1);
    err_has("line 2: longer than 197 bytes");
    /* Also the last line without a newline, and a comment line. */
    memset(text, ';', 300);
    text[300] = '\0';
    assert_int_equal(ini(text), -1);
    err_has("line 1: longer than 197 bytes");
}

#define SECRET "Sx9-s3cr3t-K3y-qQ"
#define APIKEY "Ax7-ap1-K3y-wW"
#define DBPASS "Dz5-pa55w0rd-vV"

static void test_secrets_never_shown(void **state)
{
    char *text;
    char big[1100];

    (void)state;
    assert_int_equal(ini("[auth]\nsecret_key = " SECRET "\napi_key = " APIKEY "\n"), 0);
    assert_string_equal(cfg.secret_key, SECRET);
    assert_string_equal(cfg.api_key, APIKEY);
    text = print_cfg();
    assert_null(strstr(text, SECRET));
    assert_null(strstr(text, APIKEY));
    assert_non_null(strstr(text, "\nsecret_key = ***\n"));
    assert_non_null(strstr(text, "\napi_key = ***\n"));
    free(text);

    /* Errors on lines that hold a secret. */
    static const char *const bad[] = {
        "[auth]\nsecret_kye = " SECRET "\n",                 /* misspelt key */
        "[auth]\nsecret_key " SECRET "\n",                   /* no '=' */
        "[auth]\nsecret_key = " SECRET "\x01\n",             /* control character */
        "[auth]\napi_key = " APIKEY "\x7f\n",                /* DEL */
        "[auth]\nsecret_key = a\nsecret_key = " SECRET "\n", /* duplicate */
        "secret_key = " SECRET "\n",                         /* outside a section */
        "[server]\nsecret_key = " SECRET "\n",               /* wrong section */
        "[auth]\ntoken = " APIKEY "\n",                      /* unknown key */
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        arq_config_t c2;
        assert_int_equal(arq_config_defaults(&c2), 0);
        err[0] = '\0';
        assert_int_equal(arq_config_apply_ini(&c2, bad[i], strlen(bad[i]), err, sizeof(err)), -1);
        assert_true(err[0] != '\0');
        err_has("line ");
        err_lacks(SECRET);
        err_lacks(APIKEY);
        arq_config_free(&c2);
    }
    /* A line too long, holding a secret. */
    (void)snprintf(big, sizeof(big), "[auth]\nsecret_key = %0400d" SECRET "\n", 0);
    assert_int_equal(ini(big), -1);
    err_has("line 2: longer than");
    err_lacks(SECRET);
    /* Environment: control characters, overlong. */
    assert_int_equal(env1("SECRET_KEY=" SECRET "\n"), -1);
    err_has("SECRET_KEY (auth.secret_key): invalid value (secret, not shown)");
    err_lacks(SECRET);
    assert_int_equal(env1("ARQ_API_KEY=\t" APIKEY), -1);
    err_has("ARQ_API_KEY");
    err_lacks(APIKEY);
    (void)snprintf(big, sizeof(big), "SECRET_KEY=%01050d" SECRET, 0);
    assert_int_equal(env1(big), -1);
    err_has("longer than 1024 bytes");
    err_lacks(SECRET);
    assert_int_equal(arq_config_set(&cfg, "auth", "secret_key", SECRET "\x02", err, sizeof(err)),
                     -1);
    err_has("auth.secret_key");
    err_lacks(SECRET);
    /* Failed attempts left the configured secrets alone. */
    assert_string_equal(cfg.secret_key, SECRET);
    assert_string_equal(cfg.api_key, APIKEY);
}

static void test_database_url(void **state)
{
    char *text;

    (void)state;
    assert_int_equal(env1("DATABASE_URL=mysql://arq:" DBPASS "@db.example:3306/arqdb"), 0);
    assert_string_equal(cfg.database_url, "mysql://arq:" DBPASS "@db.example:3306/arqdb");
    text = print_cfg();
    assert_non_null(strstr(text, "\n[database]\nurl = mysql://arq:***@db.example:3306/arqdb\n"));
    assert_null(strstr(text, DBPASS));
    free(text);

    /* No password: nothing to mask. */
    assert_int_equal(env1("DATABASE_URL=mysql://arq@[::1]/arqdb"), 0);
    text = print_cfg();
    assert_non_null(strstr(text, "url = mysql://arq@[::1]/arqdb\n"));
    free(text);
    /* A password with '@' and ':' in it; a driver suffix is dropped. */
    assert_int_equal(env1("DATABASE_URL=mysql+pymysql://arq:" DBPASS "@:x@h/d"), 0);
    assert_string_equal(cfg.database_url, "mysql://arq:" DBPASS "@:x@h/d");
    text = print_cfg();
    assert_non_null(strstr(text, "url = mysql://arq:***@h/d\n"));
    assert_null(strstr(text, DBPASS));
    free(text);

    /* Bad URLs: the error shows the URL, never the password. */
    static const char *const bad[] = {
        "DATABASE_URL=mysql://arq:" DBPASS "@db:99999/arqdb",
        "DATABASE_URL=postgres://arq:" DBPASS "@db/arqdb",
        "DATABASE_URL=mysql://arq:" DBPASS,
        "DATABASE_URL=mysql://arq:" DBPASS "/arqdb",
        "DATABASE_URL=mysql://arq:" DBPASS "@",
        "DATABASE_URL=mysql://:" DBPASS "@db/arqdb",
        "DATABASE_URL=arq:" DBPASS "@db/arqdb",
        "DATABASE_URL=mysql://arq:" DBPASS "@db/arq db",
        "DATABASE_URL=arq:" DBPASS "@db/x://y",
        "DATABASE_URL=mysql://arq:" DBPASS "@db/x://y",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        if (env1(bad[i]) != -1)
            fail_msg("accepted: %s", bad[i]);
        err_has("DATABASE_URL (database.url): invalid value");
        err_lacks(DBPASS);
    }
    assert_int_equal(env1("DATABASE_URL=mysql://arq:" DBPASS "@db:99999/arqdb"), -1);
    err_has("'mysql://arq:***@db:99999/arqdb'");
    assert_int_equal(ini("[database]\nurl = mysql://arq:" DBPASS "@db:0/x\n"), -1);
    err_has("line 2: database.url: invalid value 'mysql://arq:***@db:0/x'");
    err_lacks(DBPASS);
    /* The last good value is still there. */
    assert_string_equal(cfg.database_url, "mysql://arq:" DBPASS "@:x@h/d");

    /* Options after '?' are the sync module's to check (at start-up); the
     * printed configuration masks them like a password. */
    assert_int_equal(env1("DATABASE_URL=mysql://arq@db/arqdb?password=" DBPASS), 0);
    text = print_cfg();
    assert_non_null(strstr(text, "url = mysql://arq@db/arqdb?***\n"));
    assert_null(strstr(text, DBPASS));
    free(text);
}

static void test_size_suffixes(void **state)
{
    static const struct {
        const char *v;
        uint64_t want;
    } ok[] = {
        {"16G", 16ull << 30},
        {"16g", 16ull << 30},
        {"512M", 512ull << 20},
        {"1M", 1ull << 20},
        {"1048576", 1ull << 20},
        {"2048k", 2ull << 20},
        {"3K", 0},
        {"16384G", 16384ull << 30},
    };
    static const char *const bad[] = {
        "16GB", "16 G", "G", "-1G", "1.5G", "16T", "0x10M", "99999999999G", "18446744073709551615K",
    };

    (void)state;
    for (size_t i = 0; i < sizeof(ok) / sizeof(ok[0]); i++) {
        int rc = arq_config_set(&cfg, "wal", "map_size_max", ok[i].v, err, sizeof(err));
        if (ok[i].want == 0) {
            assert_int_equal(rc, -1); /* 3K: below the 1M minimum */
            err_has("wal.map_size_max: invalid value '3K'");
            continue;
        }
        if (rc != 0)
            fail_msg("'%s' rejected: %s", ok[i].v, err);
        assert_true(cfg.map_size_max == ok[i].want);
    }
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        char want[64];
        if (arq_config_set(&cfg, "wal", "map_size_max", bad[i], err, sizeof(err)) != -1)
            fail_msg("accepted '%s'", bad[i]);
        (void)snprintf(want, sizeof(want), "'%s'", bad[i]);
        err_has(want);
    }
    /* The other byte sizes take suffixes too. */
    assert_int_equal(ini("[limits]\nmax_message_bytes = 4M\nmax_frame_bytes = 4160K\n"
                         "max_output_bytes = 1G\n[server]\nmax_header_bytes = 64k\n"),
                     0);
    assert_int_equal(cfg.max_message_bytes, 4 << 20);
    assert_int_equal(cfg.max_frame_bytes, 4160 << 10);
    assert_int_equal(cfg.max_output_bytes, 1 << 30);
    assert_int_equal(cfg.max_header_bytes, 64 << 10);
    /* Plain integers take none. */
    assert_int_equal(arq_config_set(&cfg, "server", "port", "8K", err, sizeof(err)), -1);
}

static void test_origins(void **state)
{
    char list[2048];
    size_t n = 0;

    (void)state;
    assert_int_equal(
        arq_config_set(&cfg, "auth", "origins", " https://a , https://b ", err, sizeof(err)), 0);
    assert_int_equal(cfg.n_origins, 2);
    assert_string_equal(cfg.origins[0], "https://a");
    assert_string_equal(cfg.origins[1], "https://b");
    for (int i = 0; i < 65; i++)
        n += (size_t)snprintf(list + n, sizeof(list) - n, "%so%d", i ? "," : "", i);
    assert_int_equal(arq_config_set(&cfg, "auth", "origins", list, err, sizeof(err)), -1);
    err_has("more than 64 origins");
    assert_int_equal(cfg.n_origins, 2);
    assert_int_equal(arq_config_set(&cfg, "auth", "origins", "a,", err, sizeof(err)), -1);
    assert_int_equal(arq_config_set(&cfg, "auth", "origins", "   ", err, sizeof(err)), 0);
    assert_null(cfg.origins);
}

static void test_print_round_trip(void **state)
{
    arq_config_t again;
    char *text, *text2;

    (void)state;
    text = print_cfg();
    assert_non_null(strstr(text, "[server]\nhost = 127.0.0.1\nport = 8000\n"));
    assert_non_null(strstr(text, "\nsecret_key =\nprevious_secret_key =\nanonymous = false\n"
                                 "api_key =\napi_open = false\norigins =\n"));
    assert_non_null(strstr(text, "\ntrusted_proxies =\nmonitor_allow = 127.0.0.0/8,::1\n"));
    assert_non_null(strstr(text, "\nmap_size_max = 17179869184\n"));
    assert_non_null(strstr(text, "\n[database]\nurl =\n"));
    free(text);

    /* Everything but the secrets survives print -> parse -> print. */
    assert_int_equal(ini(full_ini), 0);
    assert_int_equal(arq_config_set(&cfg, "auth", "secret_key", "", err, sizeof(err)), 0);
    assert_int_equal(arq_config_set(&cfg, "auth", "api_key", "", err, sizeof(err)), 0);
    assert_int_equal(arq_config_set(&cfg, "database", "url", "mysql://u@h:1/d", err, sizeof(err)),
                     0);
    text = print_cfg();
    assert_int_equal(arq_config_defaults(&again), 0);
    if (arq_config_apply_ini(&again, text, strlen(text), err, sizeof(err)) != 0)
        fail_msg("printed config does not parse: %s\n%s", err, text);
    assert_int_equal(arq_config_print(&again, &text2), 0);
    assert_string_equal(text, text2);
    free(text);
    free(text2);
    arq_config_free(&again);
}

/* Issue #18's keys: booleans, CIDR lists (checked with api/addr.c), secrets. */
static void test_deploy_keys(void **state)
{
    (void)state;
    assert_int_equal(cfg.anonymous, 0);
    assert_int_equal(cfg.api_open, 0);
    assert_int_equal(cfg.expiry_grace_s, 10);
    assert_int_equal(cfg.n_trusted_proxies, 0);
    assert_int_equal(cfg.n_monitor_allow, 2);
    static const char *const yes[] = {"true", "TRUE", "on", "yes", "1"};
    for (size_t i = 0; i < 5; i++) {
        assert_int_equal(arq_config_set(&cfg, "auth", "anonymous", yes[i], err, sizeof(err)), 0);
        assert_int_equal(cfg.anonymous, 1);
        assert_int_equal(arq_config_set(&cfg, "auth", "anonymous", "false", err, sizeof(err)), 0);
        assert_int_equal(cfg.anonymous, 0);
    }
    assert_int_equal(arq_config_set(&cfg, "auth", "api_open", "maybe", err, sizeof(err)), -1);
    err_has("auth.api_open: invalid value 'maybe': expected true or false");

    assert_int_equal(arq_config_set(&cfg, "server", "trusted_proxies",
                                    "127.0.0.1, 10.0.0.0/8,fd00::/8", err, sizeof(err)),
                     0);
    assert_int_equal(cfg.n_trusted_proxies, 3);
    assert_string_equal(cfg.trusted_proxies[1], "10.0.0.0/8");
    /* a bad range leaves the list as it was */
    assert_int_equal(
        arq_config_set(&cfg, "server", "trusted_proxies", "10.1.0.0/8", err, sizeof(err)), -1);
    err_has("host bits set");
    assert_int_equal(
        arq_config_set(&cfg, "server", "trusted_proxies", "10.0.0.0/33", err, sizeof(err)), -1);
    err_has("prefix length too long");
    assert_int_equal(
        arq_config_set(&cfg, "server", "trusted_proxies", "nginx.local", err, sizeof(err)), -1);
    err_has("not an IPv4 or IPv6 address");
    assert_int_equal(cfg.n_trusted_proxies, 3);
    assert_int_equal(arq_config_set(&cfg, "server", "monitor_allow", "", err, sizeof(err)), 0);
    assert_int_equal(cfg.n_monitor_allow, 0);
    assert_null(cfg.monitor_allow);

    const char *env[] = {"ARQ_ANONYMOUS=yes", "SECRET_KEY_PREVIOUS=old-key",
                         "ARQ_TRUSTED_PROXIES=192.0.2.1", "ARQ_MONITOR_TOKEN=mon", NULL};
    assert_int_equal(arq_config_apply_env(&cfg, (char *const *)env, err, sizeof(err)), 0);
    assert_int_equal(cfg.anonymous, 1);
    assert_string_equal(cfg.previous_secret_key, "old-key");
    assert_int_equal(cfg.n_trusted_proxies, 1);
    assert_string_equal(cfg.monitor_token, "mon");
    char *text = print_cfg();
    assert_null(strstr(text, "old-key"));
    assert_null(strstr(text, "= mon"));
    assert_non_null(strstr(text, "previous_secret_key = ***\n"));
    assert_non_null(strstr(text, "trusted_proxies = 192.0.2.1\n"));
    free(text);
}

static void test_every_prefix(void **state)
{
    size_t len = strlen(full_ini);

    (void)state;
    /* Every truncation either applies or fails cleanly, without leaks. */
    for (size_t n = 0; n <= len; n++) {
        arq_config_t c2;
        char *out = NULL;
        assert_int_equal(arq_config_defaults(&c2), 0);
        (void)arq_config_apply_ini(&c2, full_ini, n, err, sizeof(err));
        assert_int_equal(arq_config_print(&c2, &out), 0);
        free(out);
        arq_config_free(&c2);
    }
}

static void test_free_after_error(void **state)
{
    (void)state;
    /* Free after a failure half-way through a document, twice. */
    assert_int_equal(ini("[auth]\nsecret_key = x\norigins = a,b\n[database]\n"
                         "url = mysql://u@h/d\n[server]\nport = 70000\n"),
                     -1);
    arq_config_free(&cfg);
    arq_config_free(&cfg);
    arq_config_free(NULL);
    assert_null(cfg.host);
    assert_int_equal(arq_config_defaults(&cfg), 0); /* for teardown */
}

static void test_too_big(void **state)
{
    size_t len = 1024 * 1024 + 1;
    char *text = malloc(len);

    (void)state;
    assert_non_null(text);
    memset(text, '\n', len);
    assert_int_equal(arq_config_apply_ini(&cfg, text, len, err, sizeof(err)), -1);
    err_has("larger than 1048576 bytes");
    assert_int_equal(arq_config_apply_ini(&cfg, text, len - 1, err, sizeof(err)), 0);
    free(text);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_defaults, setup, teardown),
        cmocka_unit_test_setup_teardown(test_ini_every_key, setup, teardown),
        cmocka_unit_test_setup_teardown(test_ini_syntax_forms, setup, teardown),
        cmocka_unit_test_setup_teardown(test_env_overrides_ini, setup, teardown),
        cmocka_unit_test_setup_teardown(test_env_empty_unsets_secrets, setup, teardown),
        cmocka_unit_test_setup_teardown(test_set_overrides_env, setup, teardown),
        cmocka_unit_test_setup_teardown(test_set_errors, setup, teardown),
        cmocka_unit_test_setup_teardown(test_invalid_ini_values, setup, teardown),
        cmocka_unit_test_setup_teardown(test_invalid_env_values, setup, teardown),
        cmocka_unit_test_setup_teardown(test_unknown_and_syntax, setup, teardown),
        cmocka_unit_test_setup_teardown(test_line_limit, setup, teardown),
        cmocka_unit_test_setup_teardown(test_secrets_never_shown, setup, teardown),
        cmocka_unit_test_setup_teardown(test_database_url, setup, teardown),
        cmocka_unit_test_setup_teardown(test_size_suffixes, setup, teardown),
        cmocka_unit_test_setup_teardown(test_origins, setup, teardown),
        cmocka_unit_test_setup_teardown(test_print_round_trip, setup, teardown),
        cmocka_unit_test_setup_teardown(test_deploy_keys, setup, teardown),
        cmocka_unit_test_setup_teardown(test_every_prefix, setup, teardown),
        cmocka_unit_test_setup_teardown(test_free_after_error, setup, teardown),
        cmocka_unit_test_setup_teardown(test_too_big, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

/*
 * http_test.c - the HTTP/1.1 request-head parser and the WebSocket opening
 * handshake: every rejection rule with a minimal input, incremental feeding
 * in every chunking down to one byte, and the RFC 6455 example key.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "http.h"

#define MAX_HEAD 8192

#define UPGRADE_REQ                                                                                \
    "GET /ws?stream=chat HTTP/1.1\r\n"                                                             \
    "Host: broker.example:8080\r\n"                                                                \
    "Upgrade: websocket\r\n"                                                                       \
    "Connection: Upgrade\r\n"                                                                      \
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"                                              \
    "Sec-WebSocket-Version: 13\r\n"                                                                \
    "Sec-WebSocket-Protocol: arq.v1, chat\r\n"                                                     \
    "\r\n"

/* RFC 6455 section 1.3 (computed independently: base64(sha1(key + GUID))) */
#define RFC6455_ACCEPT "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="

/* Parse a NUL-terminated string from an exact-size heap copy, so that a
 * read past len is caught by AddressSanitizer. */
static int parse_n(const char *s, size_t len, size_t max_head, http_request_t *req)
{
    char *copy = malloc(len ? len : 1);
    assert_non_null(copy);
    memcpy(copy, s, len);
    int rc = http_parse_request(copy, len, max_head, req);
    free(copy);
    return rc;
}

static int parse(const char *s, http_request_t *req)
{
    return parse_n(s, strlen(s), MAX_HEAD, req);
}

/* The result of parsing s, freeing the request on success. */
static int parse_rc(const char *s)
{
    http_request_t req;
    int rc = parse(s, &req);
    if (rc == HTTP_OK)
        http_request_free(&req);
    return rc;
}

static void test_rfc6455_example_key(void **state)
{
    (void)state;
    http_request_t req;
    char accept[29];
    const char *reason = NULL;

    assert_int_equal(parse(UPGRADE_REQ, &req), HTTP_OK);
    assert_int_equal(http_ws_check(&req, accept, &reason), 0);
    assert_string_equal(accept, RFC6455_ACCEPT);
    assert_null(reason);
    http_request_free(&req);
}

static void test_parse_fields(void **state)
{
    (void)state;
    http_request_t req;
    const char *s = UPGRADE_REQ "\x81\x05hello"; /* a frame right behind the head */

    assert_int_equal(parse_n(s, strlen(s), MAX_HEAD, &req), HTTP_OK);
    assert_int_equal(req.head_len, strlen(UPGRADE_REQ));
    assert_string_equal(req.method, "GET");
    assert_string_equal(req.target, "/ws?stream=chat");
    assert_int_equal(req.minor, 1);
    assert_int_equal(req.n_headers, 6);
    assert_string_equal(req.headers[0].name, "Host");
    assert_string_equal(req.headers[0].value, "broker.example:8080");
    assert_string_equal(req.headers[5].name, "Sec-WebSocket-Protocol");
    assert_string_equal(req.headers[5].value, "arq.v1, chat");
    assert_int_equal(req.content_length, 0);
    assert_non_null(req.buf);
    http_request_free(&req);
    assert_null(req.buf);
    http_request_free(&req); /* idempotent */
}

/* The request owns its copy: the caller's buffer may be reused at once. */
static void test_owns_copy(void **state)
{
    (void)state;
    char buf[] = UPGRADE_REQ;
    http_request_t req;

    assert_int_equal(http_parse_request(buf, strlen(buf), MAX_HEAD, &req), HTTP_OK);
    memset(buf, 'x', sizeof(buf));
    assert_string_equal(req.target, "/ws?stream=chat");
    assert_string_equal(http_header_get(&req, "upgrade"), "websocket");
    http_request_free(&req);
}

static void expect_same(const http_request_t *a, const http_request_t *b)
{
    assert_string_equal(a->method, b->method);
    assert_string_equal(a->target, b->target);
    assert_int_equal(a->minor, b->minor);
    assert_int_equal(a->head_len, b->head_len);
    assert_int_equal(a->content_length, b->content_length);
    assert_int_equal(a->n_headers, b->n_headers);
    for (size_t k = 0; k < a->n_headers; k++) {
        assert_string_equal(a->headers[k].name, b->headers[k].name);
        assert_string_equal(a->headers[k].value, b->headers[k].value);
    }
}

/* Feed s (with trailing bytes after the head) as growing prefixes in every
 * chunk size from 1 to its length: EAGAIN until the head is complete, then
 * exactly the one-shot result. */
static void feed_all_chunkings(const char *s, size_t head_len)
{
    size_t len = strlen(s);
    http_request_t whole;
    char accept_whole[29], accept[29];

    assert_int_equal(parse_n(s, len, MAX_HEAD, &whole), HTTP_OK);
    assert_int_equal(whole.head_len, head_len);
    assert_int_equal(http_ws_check(&whole, accept_whole, NULL), 0);

    for (size_t chunk = 1; chunk <= len; chunk++) {
        size_t have = 0;
        int rc = HTTP_EAGAIN;
        http_request_t req;
        while (rc == HTTP_EAGAIN && have < len) {
            have = have + chunk < len ? have + chunk : len;
            rc = parse_n(s, have, MAX_HEAD, &req);
            if (have < head_len)
                assert_int_equal(rc, HTTP_EAGAIN);
        }
        assert_int_equal(rc, HTTP_OK);
        expect_same(&req, &whole);
        assert_int_equal(http_ws_check(&req, accept, NULL), 0);
        assert_string_equal(accept, accept_whole);
        http_request_free(&req);
    }
    assert_string_equal(accept_whole, RFC6455_ACCEPT);
    http_request_free(&whole);
}

static void test_chunked_upgrade(void **state)
{
    (void)state;
    feed_all_chunkings(UPGRADE_REQ, strlen(UPGRADE_REQ));
    feed_all_chunkings(UPGRADE_REQ "\x81\x85", strlen(UPGRADE_REQ));
    /* Leading empty lines are skipped but consumed. */
    feed_all_chunkings("\r\n\r\n" UPGRADE_REQ, 4 + strlen(UPGRADE_REQ));
}

/* Every prefix of a head is EAGAIN, including a split CRLFCRLF. */
static void test_prefixes_eagain(void **state)
{
    (void)state;
    const char *s = "GET / HTTP/1.1\r\nHost: a\r\n\r\n";
    size_t len = strlen(s);
    http_request_t req;

    for (size_t n = 0; n < len; n++)
        assert_int_equal(parse_n(s, n, MAX_HEAD, &req), HTTP_EAGAIN);
    assert_int_equal(parse_n(s, len, MAX_HEAD, &req), HTTP_OK);
    http_request_free(&req);
    assert_int_equal(http_parse_request(NULL, 0, MAX_HEAD, &req), HTTP_EAGAIN);
}

static void test_head_too_big(void **state)
{
    (void)state;
    const char *s = "GET / HTTP/1.1\r\nHost: a\r\n\r\n";
    size_t len = strlen(s);
    http_request_t req;

    /* A head that ends exactly at the limit is accepted. */
    assert_int_equal(parse_n(s, len, len, &req), HTTP_OK);
    assert_int_equal(req.head_len, len);
    http_request_free(&req);
    /* One byte over: too big once len reaches the limit, also when the
     * whole head (and more) is already there. */
    assert_int_equal(parse_n(s, len - 2, len - 1, &req), HTTP_EAGAIN);
    assert_int_equal(parse_n(s, len - 1, len - 1, &req), HTTP_ETOOBIG);
    assert_int_equal(parse_n(s, len, len - 1, &req), HTTP_ETOOBIG);

    /* A long header with no end in sight. */
    size_t big = MAX_HEAD + 100;
    char *p = malloc(big + 1);
    assert_non_null(p);
    memcpy(p, "GET / HTTP/1.1\r\nX-Pad: ", 23);
    memset(p + 23, 'a', big - 23);
    p[big] = '\0';
    assert_int_equal(parse_n(p, MAX_HEAD - 1, MAX_HEAD, &req), HTTP_EAGAIN);
    assert_int_equal(parse_n(p, MAX_HEAD, MAX_HEAD, &req), HTTP_ETOOBIG);
    assert_int_equal(parse_n(p, big, MAX_HEAD, &req), HTTP_ETOOBIG);
    /* Empty lines before the request-line count towards the limit too. */
    for (size_t i = 0; i + 1 < big; i += 2)
        memcpy(p + i, "\r\n", 2);
    assert_int_equal(parse_n(p, MAX_HEAD, MAX_HEAD, &req), HTTP_ETOOBIG);
    free(p);
}

static void test_too_many_headers(void **state)
{
    (void)state;
    char s[4096];
    size_t n = 0;
    http_request_t req;

    n += (size_t)snprintf(s + n, sizeof(s) - n, "GET / HTTP/1.1\r\nHost: a\r\n");
    for (int i = 1; i < HTTP_MAX_HEADERS; i++)
        n += (size_t)snprintf(s + n, sizeof(s) - n, "X-H%d: %d\r\n", i, i);
    snprintf(s + n, sizeof(s) - n, "\r\n");
    assert_int_equal(parse(s, &req), HTTP_OK);
    assert_int_equal(req.n_headers, HTTP_MAX_HEADERS);
    assert_string_equal(http_header_get(&req, "x-h63"), "63");
    http_request_free(&req);

    snprintf(s + n, sizeof(s) - n, "X-One-More: 1\r\n\r\n");
    assert_int_equal(parse(s, &req), HTTP_ETOOBIG);
}

struct reject_case {
    const char *in;
    int rc;
};

#define H "Host: a\r\n"

static const struct reject_case reject_cases[] = {
    /* line ends */
    {"GET / HTTP/1.1\n" H "\r\n", HTTP_EBAD},
    {"GET / HTTP/1.1\r\n" H "\n", HTTP_EBAD},
    {"GET / HTTP/1.1\r\nHost: a\n\r\n", HTTP_EBAD},
    {"GET / HTTP/1.1\r\n" H "\n\n", HTTP_EBAD},
    {"\n", HTTP_EBAD},
    {"GET / HTTP/1.1\n", HTTP_EBAD}, /* rejected before the head is complete */
    {"GET / HTTP/1.1\r\nX: a\rb\r\n" H "\r\n", HTTP_EBAD},
    {"GET / HTTP/1.1\r\r\n" H "\r\n", HTTP_EBAD},
    /* request-line */
    {"GET  / HTTP/1.1\r\n" H "\r\n", HTTP_EBAD},
    {"GET /  HTTP/1.1\r\n" H "\r\n", HTTP_EBAD},
    {"GET / HTTP/1.1 \r\n" H "\r\n", HTTP_EBAD},
    {" GET / HTTP/1.1\r\n" H "\r\n", HTTP_EBAD},
    {"GET\t/ HTTP/1.1\r\n" H "\r\n", HTTP_EBAD},
    {"GET /\x01 HTTP/1.1\r\n" H "\r\n", HTTP_EBAD},
    {"GET /\x7f HTTP/1.1\r\n" H "\r\n", HTTP_EBAD},
    {"GET /\xc3\xa9 HTTP/1.1\r\n" H "\r\n", HTTP_EBAD},
    {"GET / HTTP/1.1\r\n\r\n", HTTP_EBAD}, /* no Host */
    {"GET\r\n" H "\r\n", HTTP_EBAD},
    {"GET /\r\n" H "\r\n", HTTP_EBAD}, /* HTTP/0.9 style */
    {"/ HTTP/1.1\r\n" H "\r\n", HTTP_EBAD},
    {"G(T / HTTP/1.1\r\n" H "\r\n", HTTP_EBAD},
    /* target form */
    {"GET * HTTP/1.1\r\n" H "\r\n", HTTP_EBAD},
    {"GET http://a/ HTTP/1.1\r\n" H "\r\n", HTTP_EBAD},
    {"GET a/b HTTP/1.1\r\n" H "\r\n", HTTP_EBAD},
    /* version */
    {"GET / HTTP/1.2\r\n" H "\r\n", HTTP_EVERSION},
    {"GET / HTTP/2.0\r\n" H "\r\n", HTTP_EVERSION},
    {"GET / HTTP/0.9\r\n" H "\r\n", HTTP_EVERSION},
    {"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", HTTP_EVERSION},
    {"GET / HTTP/1.10\r\n" H "\r\n", HTTP_EBAD},
    {"GET / HTTP/1\r\n" H "\r\n", HTTP_EBAD},
    {"GET / http/1.1\r\n" H "\r\n", HTTP_EBAD},
    {"GET / HTTP/1,1\r\n" H "\r\n", HTTP_EBAD},
    /* method */
    {"PUT / HTTP/1.1\r\n" H "\r\n", HTTP_EMETHOD},
    {"get / HTTP/1.1\r\n" H "\r\n", HTTP_EMETHOD},
    {"OPTIONS / HTTP/1.1\r\n" H "\r\n", HTTP_EMETHOD},
    {"PROPFIND / HTTP/1.1\r\n" H "\r\n", HTTP_EMETHOD},
    {"GETGETGETGET / HTTP/1.1\r\n" H "\r\n", HTTP_EMETHOD},
    {"PUT / HTTP/1.1\r\n\r\n", HTTP_EBAD}, /* 405 only for a valid head */
    /* field lines */
    {"GET / HTTP/1.1\r\n" H "X-A: 1\r\n 2\r\n\r\n", HTTP_EBAD},  /* obs-fold */
    {"GET / HTTP/1.1\r\n" H "X-A: 1\r\n\t2\r\n\r\n", HTTP_EBAD}, /* obs-fold */
    {"GET / HTTP/1.1\r\n " H "\r\n", HTTP_EBAD},
    {"GET / HTTP/1.1\r\nHost : a\r\n\r\n", HTTP_EBAD},
    {"GET / HTTP/1.1\r\nHost\t: a\r\n\r\n", HTTP_EBAD},
    {"GET / HTTP/1.1\r\n" H ": a\r\n\r\n", HTTP_EBAD},
    {"GET / HTTP/1.1\r\n" H "X-A\r\n\r\n", HTTP_EBAD},
    {"GET / HTTP/1.1\r\n" H "X(A): 1\r\n\r\n", HTTP_EBAD},
    {"GET / HTTP/1.1\r\n" H "X-A: a\x01"
     "b\r\n\r\n",
     HTTP_EBAD},
    {"GET / HTTP/1.1\r\n" H "X-A: a\x7f\r\n\r\n", HTTP_EBAD},
    /* Host */
    {"GET / HTTP/1.1\r\n" H H "\r\n", HTTP_EBAD},
    {"GET / HTTP/1.0\r\n" H H "\r\n", HTTP_EBAD},
    {"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", HTTP_EBAD},
    {"GET / HTTP/1.1\r\nHost: a\xc3\xa9\r\n\r\n", HTTP_EBAD},
    {"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", HTTP_EBAD},
    /* framing */
    {"POST / HTTP/1.1\r\n" H "Transfer-Encoding: chunked\r\n\r\n", HTTP_ELENGTH},
    {"POST / HTTP/1.1\r\n" H "transfer-encoding: identity\r\n\r\n", HTTP_ELENGTH},
    {"POST / HTTP/1.1\r\n" H "Transfer-Encoding: chunked\r\nHost: x\r\n\r\n", HTTP_EBAD},
    {"BREW / HTTP/1.1\r\n" H "Transfer-Encoding: chunked\r\n\r\n", HTTP_EMETHOD},
    {"POST / HTTP/1.1\r\n" H "Transfer-Encoding:\r\n\r\n", HTTP_EBAD},
    {"POST / HTTP/1.1\r\n" H "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", HTTP_EBAD},
};

static void test_rejections(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof(reject_cases) / sizeof(reject_cases[0]); i++) {
        const struct reject_case *c = &reject_cases[i];
        http_request_t req;
        memset(&req, 0xa5, sizeof(req));
        int rc = parse(c->in, &req);
        if (rc != c->rc)
            fail_msg("case %zu: got %d, want %d", i, rc, c->rc);
        /* The request is untouched on failure. */
        for (size_t b = 0; b < sizeof(req); b++)
            assert_int_equal(((unsigned char *)&req)[b], 0xa5);
    }
}

/* NUL bytes (which strlen-based tables cannot hold) and bare CR. */
static void test_nul_in_head(void **state)
{
    (void)state;
    static const char a[] = "GET / HTTP/1.1\r\nHost: a\r\nX-A: \0\r\n\r\n";
    static const char b[] = "GET /\0 HTTP/1.1\r\nHost: a\r\n\r\n";
    static const char c[] = "GET / HTTP/1.1\r\nHo\0st: a\r\n\r\n";
    http_request_t req;

    assert_int_equal(parse_n(a, sizeof(a) - 1, MAX_HEAD, &req), HTTP_EBAD);
    assert_int_equal(parse_n(b, sizeof(b) - 1, MAX_HEAD, &req), HTTP_EBAD);
    assert_int_equal(parse_n(c, sizeof(c) - 1, MAX_HEAD, &req), HTTP_EBAD);
}

static void test_methods(void **state)
{
    (void)state;
    static const char *const methods[] = {"GET", "HEAD", "POST"};
    for (size_t i = 0; i < 3; i++) {
        char s[128];
        http_request_t req;
        snprintf(s, sizeof(s), "%s /health HTTP/1.1\r\nHost: a\r\n\r\n", methods[i]);
        assert_int_equal(parse(s, &req), HTTP_OK);
        assert_string_equal(req.method, methods[i]);
        assert_string_equal(req.target, "/health");
        http_request_free(&req);
    }
}

static void test_http10(void **state)
{
    (void)state;
    http_request_t req;

    assert_int_equal(parse("GET /metrics HTTP/1.0\r\n\r\n", &req), HTTP_OK);
    assert_int_equal(req.minor, 0);
    assert_int_equal(req.n_headers, 0);
    assert_null(http_header_get(&req, "host"));
    http_request_free(&req);
    assert_int_equal(parse_rc("GET / HTTP/1.0\r\n" H "\r\n"), HTTP_OK);
}

static void test_whitespace_and_values(void **state)
{
    (void)state;
    http_request_t req;

    assert_int_equal(parse("GET / HTTP/1.1\r\nHost:a\r\nX-A: \t spaced  out \t\r\nX-Empty:\r\n"
                           "X-Blank:   \r\nX-Obs: caf\xc3\xa9\r\n\r\n",
                           &req),
                     HTTP_OK);
    assert_string_equal(http_header_get(&req, "host"), "a");
    assert_string_equal(http_header_get(&req, "x-a"), "spaced  out");
    assert_string_equal(http_header_get(&req, "x-empty"), "");
    assert_string_equal(http_header_get(&req, "x-blank"), "");
    assert_string_equal(http_header_get(&req, "x-obs"), "caf\xc3\xa9");
    http_request_free(&req);

    /* Empty Host is allowed (origin-form has no authority). */
    assert_int_equal(parse_rc("GET / HTTP/1.1\r\nHost:\r\n\r\n"), HTTP_OK);
    assert_int_equal(parse_rc("GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n"), HTTP_OK);
    /* Empty lines before the request-line are ignored (RFC 9112 2.2). */
    assert_int_equal(parse("\r\nGET / HTTP/1.1\r\n" H "\r\n", &req), HTTP_OK);
    assert_int_equal(req.head_len, 2 + strlen("GET / HTTP/1.1\r\n" H "\r\n"));
    http_request_free(&req);
}

static void test_header_lookup(void **state)
{
    (void)state;
    http_request_t req;

    assert_int_equal(
        parse("GET / HTTP/1.1\r\nhOsT: a\r\nX-Dup: first\r\nx-dup: second\r\n\r\n", &req), HTTP_OK);
    assert_string_equal(http_header_get(&req, "Host"), "a");
    assert_string_equal(http_header_get(&req, "HOST"), "a");
    assert_string_equal(http_header_get(&req, "X-DUP"), "first");
    assert_null(http_header_get(&req, "Hos"));
    assert_null(http_header_get(&req, "Hostx"));
    assert_null(http_header_get(&req, "x-none"));
    http_request_free(&req);
}

static void test_token_lists(void **state)
{
    (void)state;
    http_request_t req;

    assert_int_equal(parse("GET / HTTP/1.1\r\n" H "Connection: keep-alive ,\tUpGrade\r\n"
                           "Upgrade: ,, WebSocket ,\r\nX-A: websocketx, xwebsocket, web socket\r\n"
                           "X-B: a\r\nx-b: b, c\r\n\r\n",
                           &req),
                     HTTP_OK);
    assert_true(http_header_has_token(&req, "connection", "upgrade"));
    assert_true(http_header_has_token(&req, "CONNECTION", "Keep-Alive"));
    assert_false(http_header_has_token(&req, "connection", "close"));
    assert_false(http_header_has_token(&req, "connection", "keep"));
    assert_true(http_header_has_token(&req, "upgrade", "websocket"));
    assert_false(http_header_has_token(&req, "upgrade", ""));
    assert_false(http_header_has_token(&req, "x-a", "websocket"));
    assert_false(http_header_has_token(&req, "x-a", "web"));
    assert_false(http_header_has_token(&req, "x-none", "a"));
    /* Every line of a list-based field counts (RFC 9110 5.3). */
    assert_true(http_header_has_token(&req, "x-b", "a"));
    assert_true(http_header_has_token(&req, "x-b", "c"));
    http_request_free(&req);
}

static void test_content_length(void **state)
{
    (void)state;
    static const struct {
        const char *fields;
        int rc;
        uint64_t value;
    } cases[] = {
        {"", HTTP_OK, 0},
        {"Content-Length: 0\r\n", HTTP_OK, 0},
        {"Content-Length: 5\r\n", HTTP_OK, 5},
        {"content-length:  42 \r\n", HTTP_OK, 42},
        {"Content-Length: 007\r\n", HTTP_OK, 7},
        {"Content-Length: 1099511627776\r\n", HTTP_OK, UINT64_C(1) << 40},
        {"Content-Length: 1099511627777\r\n", HTTP_EBAD, 0},
        {"Content-Length: 18446744073709551616\r\n", HTTP_EBAD, 0},
        {"Content-Length: 99999999999999999999999999\r\n", HTTP_EBAD, 0},
        {"Content-Length: 5\r\nContent-Length: 5\r\n", HTTP_OK, 5},
        {"Content-Length: 5\r\nContent-Length: 6\r\n", HTTP_EBAD, 0},
        {"Content-Length: 5, 5\r\n", HTTP_EBAD, 0},
        {"Content-Length: 5,6\r\n", HTTP_EBAD, 0},
        {"Content-Length: -1\r\n", HTTP_EBAD, 0},
        {"Content-Length: +5\r\n", HTTP_EBAD, 0},
        {"Content-Length: 5 5\r\n", HTTP_EBAD, 0},
        {"Content-Length: 0x10\r\n", HTTP_EBAD, 0},
        {"Content-Length: 1e3\r\n", HTTP_EBAD, 0},
        {"Content-Length:\r\n", HTTP_EBAD, 0},
        {"Content-Length: \"5\"\r\n", HTTP_EBAD, 0},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        char s[256];
        http_request_t req;
        snprintf(s, sizeof(s), "POST /api/publish HTTP/1.1\r\nHost: a\r\n%s\r\nbody",
                 cases[i].fields);
        int rc = parse(s, &req);
        if (rc != cases[i].rc)
            fail_msg("case %zu: got %d, want %d", i, rc, cases[i].rc);
        if (rc == HTTP_OK) {
            assert_true(req.content_length == cases[i].value);
            assert_int_equal(req.head_len, strlen(s) - 4);
            http_request_free(&req);
        }
    }
}

/* Parse s (which must be valid) and run http_ws_check on it. */
static int ws_check_of(const char *s, char accept[29], const char **reason)
{
    http_request_t req;
    int rc = parse(s, &req);
    assert_int_equal(rc, HTTP_OK);
    rc = http_ws_check(&req, accept, reason);
    http_request_free(&req);
    return rc;
}

#define WS_KEY  "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
#define WS_VER  "Sec-WebSocket-Version: 13\r\n"
#define WS_UP   "Upgrade: websocket\r\n"
#define WS_CONN "Connection: Upgrade\r\n"

static void test_ws_check(void **state)
{
    (void)state;
    static const char *const bad[] = {
        "POST / HTTP/1.1\r\n" H WS_UP WS_CONN WS_KEY WS_VER "\r\n",
        "HEAD / HTTP/1.1\r\n" H WS_UP WS_CONN WS_KEY WS_VER "\r\n",
        "GET / HTTP/1.0\r\n" H WS_UP WS_CONN WS_KEY WS_VER "\r\n",
        "GET / HTTP/1.1\r\n" H WS_CONN WS_KEY WS_VER "\r\n",
        "GET / HTTP/1.1\r\n" H "Upgrade: h2c\r\n" WS_CONN WS_KEY WS_VER "\r\n",
        "GET / HTTP/1.1\r\n" H "Upgrade: websocket/13\r\n" WS_CONN WS_KEY WS_VER "\r\n",
        "GET / HTTP/1.1\r\n" H WS_UP WS_KEY WS_VER "\r\n",
        "GET / HTTP/1.1\r\n" H WS_UP "Connection: keep-alive\r\n" WS_KEY WS_VER "\r\n",
        "GET / HTTP/1.1\r\n" H WS_UP WS_CONN WS_KEY "\r\n",
        "GET / HTTP/1.1\r\n" H WS_UP WS_CONN WS_KEY "Sec-WebSocket-Version: 8\r\n\r\n",
        "GET / HTTP/1.1\r\n" H WS_UP WS_CONN WS_KEY "Sec-WebSocket-Version: 13, 8\r\n\r\n",
        "GET / HTTP/1.1\r\n" H WS_UP WS_CONN WS_KEY "Sec-WebSocket-Version: 013\r\n\r\n",
        "GET / HTTP/1.1\r\n" H WS_UP WS_CONN WS_KEY WS_VER WS_VER "\r\n",
        "GET / HTTP/1.1\r\n" H WS_UP WS_CONN WS_VER "\r\n",
        "GET / HTTP/1.1\r\n" H WS_UP WS_CONN WS_KEY WS_KEY WS_VER "\r\n",
        "GET / HTTP/1.1\r\n" H WS_UP WS_CONN "Sec-WebSocket-Key:\r\n" WS_VER "\r\n",
        /* 15 bytes, 17 bytes, no padding, bad alphabet, non-canonical bits */
        "GET / HTTP/1.1\r\n" H WS_UP WS_CONN "Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAA\r\n" WS_VER
        "\r\n",
        "GET / HTTP/1.1\r\n" H WS_UP WS_CONN
        "Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAAA=\r\n" WS_VER "\r\n",
        "GET / HTTP/1.1\r\n" H WS_UP WS_CONN "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ\r\n" WS_VER
        "\r\n",
        "GET / HTTP/1.1\r\n" H WS_UP WS_CONN
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZ-==\r\n" WS_VER "\r\n",
        "GET / HTTP/1.1\r\n" H WS_UP WS_CONN
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZR==\r\n" WS_VER "\r\n",
        "GET / HTTP/1.1\r\n" H WS_UP WS_CONN
        "Sec-WebSocket-Key: dGhlIHNhbXBs ZSBub25jZQ==\r\n" WS_VER "\r\n",
        /* a body behind an upgrade would be read as frames */
        "GET / HTTP/1.1\r\n" H WS_UP WS_CONN WS_KEY WS_VER "Content-Length: 3\r\n\r\n",
    };
    char accept[29];

    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        const char *reason = NULL;
        memset(accept, '#', sizeof(accept));
        int rc = ws_check_of(bad[i], accept, &reason);
        if (rc != HTTP_EBAD)
            fail_msg("case %zu: got %d, want HTTP_EBAD", i, rc);
        assert_non_null(reason);
        for (size_t b = 0; b < sizeof(accept); b++)
            assert_int_equal(accept[b], '#');
    }

    /* Mixed case, token lists, several Connection lines, Content-Length 0. */
    assert_int_equal(ws_check_of("GET /ws HTTP/1.1\r\nHOST: a\r\nupgrade: WebSocket\r\n"
                                 "connection: keep-alive\r\nConnection: keep-alive, UPGRADE\r\n"
                                 "sec-websocket-key:  dGhlIHNhbXBsZSBub25jZQ==  \r\n"
                                 "SEC-WEBSOCKET-VERSION: 13\r\nContent-Length: 0\r\n\r\n",
                                 accept, NULL),
                     0);
    assert_string_equal(accept, RFC6455_ACCEPT);

    /* A second key: 16 zero bytes. */
    assert_int_equal(ws_check_of("GET / HTTP/1.1\r\n" H WS_UP WS_CONN
                                 "Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==\r\n" WS_VER "\r\n",
                                 accept, NULL),
                     0);
    assert_int_equal(strlen(accept), 28);
    assert_string_not_equal(accept, RFC6455_ACCEPT);
}

static void test_ws_protocol(void **state)
{
    (void)state;
    http_request_t req;

    assert_int_equal(parse("GET / HTTP/1.1\r\n" H WS_UP WS_CONN WS_KEY WS_VER
                           "Sec-WebSocket-Protocol: chat ,  ARQ.v1\r\n"
                           "Sec-WebSocket-Protocol: second\r\n\r\n",
                           &req),
                     HTTP_OK);
    assert_true(http_ws_offers_protocol(&req, "arq.v1"));
    assert_true(http_ws_offers_protocol(&req, "chat"));
    assert_false(http_ws_offers_protocol(&req, "arq"));
    assert_false(http_ws_offers_protocol(&req, "arq.v1, chat"));
    assert_false(http_ws_offers_protocol(&req, ""));
    /* Documented: only the first Sec-WebSocket-Protocol line is read. */
    assert_false(http_ws_offers_protocol(&req, "second"));
    http_request_free(&req);

    assert_int_equal(parse(UPGRADE_REQ, &req), HTTP_OK);
    assert_true(http_ws_offers_protocol(&req, "arq.v1"));
    http_request_free(&req);

    assert_int_equal(parse("GET / HTTP/1.1\r\n" H "\r\n", &req), HTTP_OK);
    assert_false(http_ws_offers_protocol(&req, "arq.v1"));
    http_request_free(&req);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rfc6455_example_key),
        cmocka_unit_test(test_parse_fields),
        cmocka_unit_test(test_owns_copy),
        cmocka_unit_test(test_chunked_upgrade),
        cmocka_unit_test(test_prefixes_eagain),
        cmocka_unit_test(test_head_too_big),
        cmocka_unit_test(test_too_many_headers),
        cmocka_unit_test(test_rejections),
        cmocka_unit_test(test_nul_in_head),
        cmocka_unit_test(test_methods),
        cmocka_unit_test(test_http10),
        cmocka_unit_test(test_whitespace_and_values),
        cmocka_unit_test(test_header_lookup),
        cmocka_unit_test(test_token_lists),
        cmocka_unit_test(test_content_length),
        cmocka_unit_test(test_ws_check),
        cmocka_unit_test(test_ws_protocol),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

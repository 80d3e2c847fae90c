/*
 * http.h - strict, incremental HTTP/1.1 request-head parser and the
 * WebSocket opening handshake (RFC 6455 section 4.2). Pure functions: the
 * caller feeds bytes as they arrive; nothing here does I/O or logs.
 */
#ifndef ARQ_API_HTTP_H
#define ARQ_API_HTTP_H

#include <stddef.h>
#include <stdint.h>

enum {
    HTTP_OK = 0,
    HTTP_EAGAIN = 1,    /* need more bytes (not an error) */
    HTTP_EBAD = -1,     /* malformed request: answer 400 */
    HTTP_ETOOBIG = -2,  /* head beyond the limit: answer 431 */
    HTTP_EMETHOD = -3,  /* method not supported: 405 */
    HTTP_EVERSION = -4, /* not HTTP/1.1 (or 1.0): 505 */
    HTTP_ENOMEM = -5,
    HTTP_ELENGTH = -6, /* a body without Content-Length (Transfer-Encoding): 411 */
};

#define HTTP_MAX_HEADERS 64

typedef struct http_header {
    const char *name;  /* NUL-terminated, inside the request's own buffer */
    const char *value; /* trimmed of surrounding whitespace */
} http_header_t;

typedef struct http_request {
    char method[8];     /* "GET", "POST", "HEAD" */
    const char *target; /* path and query, NUL-terminated */
    int minor;          /* HTTP/1.minor */
    http_header_t headers[HTTP_MAX_HEADERS];
    size_t n_headers;
    uint64_t content_length; /* 0 when absent */
    size_t head_len;         /* bytes consumed: the head with its final CRLFCRLF, plus any
                                empty lines skipped before the request line */
    char *buf;               /* owned copy of the head (names/values point here) */
} http_request_t;

/*
 * Parse a request head from data[0..len). Returns HTTP_EAGAIN while the
 * head is incomplete and len < max_head; HTTP_ETOOBIG once len reaches
 * max_head without a complete head. On HTTP_OK, *req is filled (free with
 * http_request_free) and req->head_len bytes were consumed; any body
 * follows. Rejects: bare LF line ends, obs-fold, control characters, a
 * missing Host on 1.1, duplicate or invalid Content-Length,
 * Transfer-Encoding (not supported), methods other than GET/HEAD/POST.
 */
int http_parse_request(const char *data, size_t len, size_t max_head, http_request_t *req);
void http_request_free(http_request_t *req);

/* Case-insensitive header lookup; the first occurrence, or NULL. */
const char *http_header_get(const http_request_t *req, const char *name);
/* Does a comma-separated header contain `token` (case-insensitive)? */
int http_header_has_token(const http_request_t *req, const char *name, const char *token);

/*
 * Validate a WebSocket upgrade request (GET, Upgrade: websocket,
 * Connection: upgrade, Sec-WebSocket-Version: 13, a Sec-WebSocket-Key that
 * is base64 of 16 bytes) and compute Sec-WebSocket-Accept (base64 of SHA-1
 * of key + GUID) into accept_out (29 bytes incl. NUL). Returns 0, or
 * HTTP_EBAD with *reason set to a static string (reason may be NULL), or
 * HTTP_ENOMEM if SHA-1 is unavailable (a server error, not the client's).
 * Duplicate key/version headers and a request body are rejected.
 */
int http_ws_check(const http_request_t *req, char accept_out[29], const char **reason);

/* Does the (first) Sec-WebSocket-Protocol header offer `proto`? */
int http_ws_offers_protocol(const http_request_t *req, const char *proto);

#endif

/*
 * http.c - strict HTTP/1.1 request-head parser (RFC 9112) and the server
 * side of the WebSocket opening handshake (RFC 6455 section 4.2.1).
 *
 * The parser keeps no state between calls: the caller passes the whole
 * buffer received so far each time bytes arrive. A call first scans the
 * first min(len, max_head) bytes for the end of the head (CRLFCRLF), which
 * is one memchr per line, and only a complete head is parsed. The scan also
 * rejects a bare LF at once, so a client using LF line ends gets its 400
 * immediately instead of waiting for the size limit.
 *
 * The result depends only on the bytes scanned, so feeding a request in any
 * chunking yields HTTP_EAGAIN for every prefix and then the same result as a
 * one-shot parse of the whole input (fuzz/api_http_request.c checks this).
 *
 * Rules beyond the grammar, and why:
 * - Empty lines before the request-line are skipped (RFC 9112 section 2.2:
 *   a server SHOULD ignore them); they count towards max_head and head_len.
 * - Exactly one SP between the parts of the request-line; the target is
 *   origin-form ('/' first) of visible ASCII only (no raw UTF-8).
 * - Only HTTP/1.0 and HTTP/1.1; any other well-formed version is
 *   HTTP_EVERSION, checked before the target and headers because another
 *   version's head is not ours to judge.
 * - Unknown methods are reported (HTTP_EMETHOD) only for an otherwise valid
 *   head, so a 405 is only ever sent for a request that was understood.
 * - More than HTTP_MAX_HEADERS fields is HTTP_ETOOBIG (431 fits exactly).
 * - More than one Host is rejected on 1.0 as on 1.1; its value must consist
 *   of authority characters (no whitespace, no obs-text).
 * - Content-Length: 1*DIGIT up to 2^40; several fields must carry the same
 *   number, a list ("5, 5") is rejected even when the members agree.
 * - Any Transfer-Encoding is refused: we read no chunked bodies, and
 *   ignoring it would desynchronise us from a proxy that does not. Alone
 *   (a body whose length the client did not give) it is HTTP_ELENGTH, for
 *   an otherwise valid head (411: send Content-Length); with a
 *   Content-Length, or empty, it is HTTP_EBAD (RFC 9112 6.1: a request
 *   that could be smuggled).
 */
#include <assert.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>

#include "http.h"

#define HTTP_CL_MAX (UINT64_C(1) << 40)

static const char ws_guid[] = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/* RFC 9110 section 5.6.2: tchar */
static int is_tchar(unsigned char c)
{
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9'))
        return 1;
    return c != '\0' && strchr("!#$%&'*+-.^_`|~", c) != NULL;
}

/* field-vchar / SP / HTAB: VCHAR, obs-text, and the two blanks */
static int is_value_char(unsigned char c)
{
    return (c >= 0x21 && c != 0x7f) || c == ' ' || c == '\t';
}

static int is_ows(unsigned char c)
{
    return c == ' ' || c == '\t';
}

/* Characters of uri-host [ ":" port ] (RFC 3986 authority without userinfo). */
static int is_host_char(unsigned char c)
{
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9'))
        return 1;
    return c != '\0' && strchr("-._~%!$&'()*+,;=:[]", c) != NULL;
}

/* Locale-independent ASCII case folding (strcasecmp follows the locale). */
static unsigned char ascii_lower(unsigned char c)
{
    return (c >= 'A' && c <= 'Z') ? (unsigned char)(c + ('a' - 'A')) : c;
}

static int ascii_caseeq_n(const char *a, const char *b, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (ascii_lower((unsigned char)a[i]) != ascii_lower((unsigned char)b[i]))
            return 0;
    return 1;
}

static int ascii_caseeq(const char *a, const char *b)
{
    size_t n = strlen(a);
    return strlen(b) == n && ascii_caseeq_n(a, b, n);
}

/*
 * Find the head in data[0..len). Returns HTTP_OK with *ret_start (first byte
 * of the request-line, after ignored empty lines) and *ret_end (one past the
 * final CRLFCRLF), or HTTP_EAGAIN / HTTP_ETOOBIG / HTTP_EBAD (bare LF).
 */
static int head_find(const char *data, size_t len, size_t max_head, size_t *ret_start,
                     size_t *ret_end)
{
    size_t win = len < max_head ? len : max_head;
    size_t start = 0, line = 0, pos = 0;

    while (pos < win) {
        const char *lf = memchr(data + pos, '\n', win - pos);
        if (!lf)
            break;
        size_t i = (size_t)(lf - data);
        if (i == 0 || data[i - 1] != '\r')
            return HTTP_EBAD;
        if (i - 1 == line) {
            /* An empty line: before the request-line it is skipped, after
             * it, it ends the head. */
            if (line == start) {
                start = i + 1;
            } else {
                *ret_start = start;
                *ret_end = i + 1;
                return HTTP_OK;
            }
        }
        line = i + 1;
        pos = i + 1;
    }
    return len >= max_head ? HTTP_ETOOBIG : HTTP_EAGAIN;
}

/* Content-Length value: 1*DIGIT, at most HTTP_CL_MAX. */
static int parse_content_length(const char *v, uint64_t *ret)
{
    uint64_t n = 0;

    if (*v == '\0')
        return HTTP_EBAD;
    for (; *v; v++) {
        if (*v < '0' || *v > '9')
            return HTTP_EBAD;
        n = n * 10 + (uint64_t)(*v - '0');
        if (n > HTTP_CL_MAX)
            return HTTP_EBAD;
    }
    *ret = n;
    return HTTP_OK;
}

/*
 * Parse the request-line at buf[0..n) (n excludes CRLF), NUL-terminating
 * method and target in place.
 */
static int parse_request_line(char *buf, size_t n, http_request_t *r)
{
    size_t i = 0, m_len, t_start, t_len;

    while (i < n && is_tchar((unsigned char)buf[i]))
        i++;
    m_len = i;
    if (m_len == 0 || i >= n || buf[i] != ' ')
        return HTTP_EBAD;
    t_start = ++i;
    while (i < n && (unsigned char)buf[i] > 0x20 && (unsigned char)buf[i] < 0x7f)
        i++;
    t_len = i - t_start;
    if (t_len == 0 || i >= n || buf[i] != ' ')
        return HTTP_EBAD;
    i++;
    /* HTTP-version = "HTTP/" DIGIT "." DIGIT, case-sensitive */
    if (n - i != 8 || memcmp(buf + i, "HTTP/", 5) != 0 || buf[i + 5] < '0' || buf[i + 5] > '9' ||
        buf[i + 6] != '.' || buf[i + 7] < '0' || buf[i + 7] > '9')
        return HTTP_EBAD;
    if (buf[i + 5] != '1' || (buf[i + 7] != '0' && buf[i + 7] != '1'))
        return HTTP_EVERSION;
    r->minor = buf[i + 7] - '0';

    if (buf[t_start] != '/')
        return HTTP_EBAD;
    buf[m_len] = '\0';
    buf[t_start + t_len] = '\0';
    r->target = buf + t_start;
    /* Remember the method only if it fits; the caller checks it last. */
    if (m_len < sizeof(r->method))
        memcpy(r->method, buf, m_len + 1);
    else
        r->method[0] = '\0';
    return HTTP_OK;
}

/* Parse one field line at buf[0..n) (n excludes CRLF) into *h. */
static int parse_field_line(char *buf, size_t n, http_header_t *h)
{
    size_t i = 0, v_start, v_end;

    /* A line starting with whitespace is obs-fold (or whitespace between
     * the request-line and the first field): RFC 9112 sections 2.2, 5.2. */
    while (i < n && is_tchar((unsigned char)buf[i]))
        i++;
    if (i == 0 || i >= n || buf[i] != ':')
        return HTTP_EBAD;
    buf[i++] = '\0';
    while (i < n && is_ows((unsigned char)buf[i]))
        i++;
    v_start = i;
    for (; i < n; i++)
        if (!is_value_char((unsigned char)buf[i]))
            return HTTP_EBAD;
    v_end = n;
    while (v_end > v_start && is_ows((unsigned char)buf[v_end - 1]))
        v_end--;
    buf[v_end] = '\0'; /* at worst the CR of the line's CRLF */
    h->name = buf;
    h->value = buf + v_start;
    return HTTP_OK;
}

/* Semantic checks over all fields: Host, Content-Length, Transfer-Encoding. */
static int check_fields(http_request_t *r)
{
    size_t hosts = 0, cls = 0, tes = 0;

    r->content_length = 0;
    for (size_t k = 0; k < r->n_headers; k++) {
        const http_header_t *h = &r->headers[k];
        if (ascii_caseeq(h->name, "host")) {
            hosts++;
            for (const char *p = h->value; *p; p++)
                if (!is_host_char((unsigned char)*p))
                    return HTTP_EBAD;
        } else if (ascii_caseeq(h->name, "content-length")) {
            uint64_t v;
            if (parse_content_length(h->value, &v) != HTTP_OK)
                return HTTP_EBAD;
            if (cls++ > 0 && v != r->content_length)
                return HTTP_EBAD;
            r->content_length = v;
        } else if (ascii_caseeq(h->name, "transfer-encoding")) {
            if (h->value[0] == 0)
                return HTTP_EBAD;
            tes++;
        }
    }
    if (hosts > 1 || (r->minor == 1 && hosts == 0) || (tes && cls))
        return HTTP_EBAD;
    return tes ? HTTP_ELENGTH : HTTP_OK;
}

int http_parse_request(const char *data, size_t len, size_t max_head, http_request_t *req)
{
    http_request_t r;
    size_t start, end, n, pos, eol;
    int rc;

    assert(req && (data || len == 0));
    rc = head_find(data, len, max_head, &start, &end);
    if (rc != HTTP_OK)
        return rc;

    memset(&r, 0, sizeof(r));
    n = end - start;
    r.buf = malloc(n + 1);
    if (!r.buf)
        return HTTP_ENOMEM;
    memcpy(r.buf, data + start, n);
    r.buf[n] = '\0';
    r.head_len = end;

    /* head_find guarantees every LF is preceded by CR, so each line is
     * buf[pos..eol) followed by CRLF, and the last line is empty. */
    eol = (size_t)((char *)memchr(r.buf, '\n', n) - r.buf) - 1;
    rc = parse_request_line(r.buf, eol, &r);
    if (rc != HTTP_OK)
        goto fail;
    for (pos = eol + 2; pos < n - 2; pos = eol + 2) {
        eol = (size_t)((char *)memchr(r.buf + pos, '\n', n - pos) - r.buf) - 1;
        http_header_t h;
        rc = parse_field_line(r.buf + pos, eol - pos, &h);
        if (rc != HTTP_OK)
            goto fail;
        if (r.n_headers == HTTP_MAX_HEADERS) {
            rc = HTTP_ETOOBIG;
            goto fail;
        }
        r.headers[r.n_headers++] = h;
    }
    rc = check_fields(&r);
    if (rc != HTTP_OK && rc != HTTP_ELENGTH)
        goto fail;
    if (strcmp(r.method, "GET") != 0 && strcmp(r.method, "HEAD") != 0 &&
        strcmp(r.method, "POST") != 0) {
        rc = HTTP_EMETHOD;
        goto fail;
    }
    if (rc != HTTP_OK)
        goto fail;
    *req = r;
    return HTTP_OK;

fail:
    free(r.buf);
    return rc;
}

void http_request_free(http_request_t *req)
{
    if (!req)
        return;
    free(req->buf);
    req->buf = NULL;
    req->target = NULL;
    req->n_headers = 0;
}

const char *http_header_get(const http_request_t *req, const char *name)
{
    for (size_t k = 0; k < req->n_headers; k++)
        if (ascii_caseeq(req->headers[k].name, name))
            return req->headers[k].value;
    return NULL;
}

/* Is `token` a member of the comma-separated list `v`? Members are trimmed
 * of OWS; empty members are skipped (RFC 9110 section 5.6.1). */
static int list_has_token(const char *v, const char *token)
{
    size_t tlen = strlen(token);

    if (tlen == 0)
        return 0;
    for (;;) {
        while (*v == ',' || is_ows((unsigned char)*v))
            v++;
        if (*v == '\0')
            return 0;
        const char *e = v;
        while (*e && *e != ',')
            e++;
        const char *t = e;
        while (t > v && is_ows((unsigned char)t[-1]))
            t--;
        if ((size_t)(t - v) == tlen && ascii_caseeq_n(v, token, tlen))
            return 1;
        v = e;
    }
}

/* Every field line with this name counts: RFC 9110 section 5.3 makes
 * several lines of a list-based field equal to one joined with commas. */
int http_header_has_token(const http_request_t *req, const char *name, const char *token)
{
    for (size_t k = 0; k < req->n_headers; k++)
        if (ascii_caseeq(req->headers[k].name, name) &&
            list_has_token(req->headers[k].value, token))
            return 1;
    return 0;
}

static size_t header_count(const http_request_t *req, const char *name)
{
    size_t c = 0;
    for (size_t k = 0; k < req->n_headers; k++)
        c += ascii_caseeq(req->headers[k].name, name) ? 1 : 0;
    return c;
}

static int b64_value(unsigned char c)
{
    if (c >= 'A' && c <= 'Z')
        return c - 'A';
    if (c >= 'a' && c <= 'z')
        return c - 'a' + 26;
    if (c >= '0' && c <= '9')
        return c - '0' + 52;
    if (c == '+')
        return 62;
    if (c == '/')
        return 63;
    return -1;
}

/* Strict base64 of exactly 16 bytes: 22 alphabet characters, "==", and the
 * unused low 4 bits of the last character zero (canonical, RFC 4648 3.5). */
static int ws_key_valid(const char *key)
{
    if (strlen(key) != 24 || key[22] != '=' || key[23] != '=')
        return 0;
    for (size_t i = 0; i < 22; i++)
        if (b64_value((unsigned char)key[i]) < 0)
            return 0;
    return (b64_value((unsigned char)key[21]) & 0x0f) == 0;
}

int http_ws_check(const http_request_t *req, char accept_out[29], const char **reason)
{
    unsigned char in[24 + sizeof(ws_guid) - 1], md[EVP_MAX_MD_SIZE];
    unsigned char out[29];
    unsigned int md_len = 0;
    const char *why = NULL, *key = NULL, *version = NULL;
    int enc_len;

    if (strcmp(req->method, "GET") != 0)
        why = "websocket upgrade needs GET";
    else if (req->minor != 1)
        why = "websocket upgrade needs HTTP/1.1";
    else if (!http_header_has_token(req, "upgrade", "websocket"))
        why = "missing 'Upgrade: websocket'";
    else if (!http_header_has_token(req, "connection", "upgrade"))
        why = "missing 'Connection: upgrade'";
    else if (header_count(req, "sec-websocket-version") != 1)
        why = "need exactly one Sec-WebSocket-Version";
    else if (strcmp((version = http_header_get(req, "sec-websocket-version")), "13") != 0)
        why = "unsupported Sec-WebSocket-Version";
    else if (header_count(req, "sec-websocket-key") != 1)
        why = "need exactly one Sec-WebSocket-Key";
    else if (!ws_key_valid((key = http_header_get(req, "sec-websocket-key"))))
        why = "Sec-WebSocket-Key is not base64 of 16 bytes";
    else if (req->content_length != 0)
        why = "websocket upgrade with a body";
    if (why) {
        if (reason)
            *reason = why;
        return HTTP_EBAD;
    }

    memcpy(in, key, 24);
    memcpy(in + 24, ws_guid, sizeof(ws_guid) - 1);
    if (EVP_Digest(in, sizeof(in), md, &md_len, EVP_sha1(), NULL) != 1 || md_len != 20) {
        /* Not the client's fault (e.g. SHA-1 unavailable in the provider). */
        if (reason)
            *reason = "sha1 unavailable";
        return HTTP_ENOMEM;
    }
    enc_len = EVP_EncodeBlock(out, md, 20); /* 20 bytes: always 28 characters + NUL */
    assert(enc_len == 28);
    (void)enc_len;
    memcpy(accept_out, out, 29);
    return 0;
}

/* Only the first Sec-WebSocket-Protocol field line is considered. */
int http_ws_offers_protocol(const http_request_t *req, const char *proto)
{
    const char *v = http_header_get(req, "sec-websocket-protocol");
    return v ? list_has_token(v, proto) : 0;
}

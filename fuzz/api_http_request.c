/*
 * Fuzz the HTTP request-head parser and the WebSocket handshake check.
 *
 * The first input byte selects the mode, the rest is the request:
 *   even: one-shot parse; on success every helper runs over the result.
 *   odd:  the request is fed as growing prefixes, (byte >> 1) + 1 bytes more
 *         each time and each prefix in a heap buffer of exactly its size, as
 *         a connection would deliver it; every prefix before the last call
 *         must give HTTP_EAGAIN, and the final result must equal a one-shot
 *         parse of the whole input (same code, same head, same fields).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "http.h"

#define MAX_HEAD 8192

static void check_request(const http_request_t *req, size_t len)
{
    char accept[29];
    const char *reason = NULL;

    if (req->head_len > len || req->head_len > MAX_HEAD || req->n_headers > HTTP_MAX_HEADERS ||
        !req->buf || !req->target || req->target[0] != '/' || (req->minor != 0 && req->minor != 1))
        abort();
    if (strcmp(req->method, "GET") != 0 && strcmp(req->method, "HEAD") != 0 &&
        strcmp(req->method, "POST") != 0)
        abort();
    if (req->content_length > (UINT64_C(1) << 40))
        abort();
    for (size_t k = 0; k < req->n_headers; k++) {
        const http_header_t *h = &req->headers[k];
        /* Names and values are NUL-terminated and lookups find them. */
        if (h->name[0] == '\0' || http_header_get(req, h->name) == NULL)
            abort();
        size_t vlen = strlen(h->value);
        if (vlen > 0 && (strchr(" \t", h->value[0]) || strchr(" \t", h->value[vlen - 1])))
            abort();
        (void)http_header_has_token(req, h->name, h->value);
    }
    if (req->minor == 1 && http_header_get(req, "host") == NULL)
        abort();
    (void)http_header_has_token(req, "connection", "upgrade");
    (void)http_ws_offers_protocol(req, "arq.v1");

    int rc = http_ws_check(req, accept, &reason);
    if (rc == 0) {
        if (strlen(accept) != 28 || strcmp(req->method, "GET") != 0)
            abort();
    } else if (rc != HTTP_EBAD || reason == NULL) {
        abort();
    }
}

static int valid_rc(int rc)
{
    return rc == HTTP_OK || rc == HTTP_EAGAIN || rc == HTTP_EBAD || rc == HTTP_ETOOBIG ||
           rc == HTTP_EMETHOD || rc == HTTP_EVERSION || rc == HTTP_ENOMEM || rc == HTTP_ELENGTH;
}

static void same_request(const http_request_t *a, const http_request_t *b)
{
    if (a->head_len != b->head_len || a->minor != b->minor ||
        a->content_length != b->content_length || a->n_headers != b->n_headers ||
        strcmp(a->method, b->method) != 0 || strcmp(a->target, b->target) != 0)
        abort();
    for (size_t k = 0; k < a->n_headers; k++)
        if (strcmp(a->headers[k].name, b->headers[k].name) != 0 ||
            strcmp(a->headers[k].value, b->headers[k].value) != 0)
            abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    http_request_t whole, part;

    if (size == 0)
        return 0;
    uint8_t mode = data[0];
    const char *in = (const char *)data + 1;
    size_t len = size - 1;

    int rc = http_parse_request(in, len, MAX_HEAD, &whole);
    if (!valid_rc(rc))
        abort();
    if (rc == HTTP_OK)
        check_request(&whole, len);

    if (mode & 1) {
        size_t step = (size_t)(mode >> 1) + 1, have = 0;
        int prc = HTTP_EAGAIN;
        while (prc == HTTP_EAGAIN && have < len) {
            have = len - have > step ? have + step : len;
            char *copy = malloc(have);
            if (!copy)
                abort();
            memcpy(copy, in, have);
            prc = http_parse_request(copy, have, MAX_HEAD, &part);
            free(copy); /* the request must not point into the caller's buffer */
        }
        if (len == 0)
            prc = http_parse_request(in, 0, MAX_HEAD, &part);
        if (prc != rc)
            abort();
        if (prc == HTTP_OK) {
            check_request(&part, len);
            same_request(&part, &whole);
            http_request_free(&part);
        }
    }
    if (rc == HTTP_OK)
        http_request_free(&whole);
    return 0;
}

/*
 * proto_test.c - the arq.v1 wire codec (proto/proto.h).
 *
 * Server messages are encoded with proto_enc_* and read back with
 * msgpack-c's own unpacker; client messages are built with msgpack-c's
 * packer and decoded with proto_decode. Hostile input (huge declared
 * lengths, deep nesting, every truncation, random mutations) must be
 * rejected with an error code, never a crash or a large allocation. Every
 * input is copied into a heap buffer of exactly its size first, so
 * AddressSanitizer catches any read past the end.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <msgpack.h>

#include "proto.h"

/* ---- allocation failures ------------------------------------------------ */

/*
 * The test is linked with -Wl,--wrap=calloc,--wrap=realloc (meson.build), so
 * every calloc/realloc of the codec (and of this file) comes here. While
 * alloc_budget >= 0, that many allocations succeed and all later ones fail.
 */
void *__real_calloc(size_t n, size_t size);
void *__real_realloc(void *p, size_t size);
void *__wrap_calloc(size_t n, size_t size);
void *__wrap_realloc(void *p, size_t size);

static long alloc_budget = -1;

static bool alloc_fails(void)
{
    if (alloc_budget < 0)
        return false;
    if (alloc_budget == 0)
        return true;
    alloc_budget--;
    return false;
}

void *__wrap_calloc(size_t n, size_t size)
{
    return alloc_fails() ? NULL : __real_calloc(n, size);
}

void *__wrap_realloc(void *p, size_t size)
{
    return alloc_fails() ? NULL : __real_realloc(p, size);
}

/* ---- helpers: building client messages ---------------------------------- */

typedef struct pk {
    msgpack_sbuffer sb;
    msgpack_packer p;
} pk_t;

static void pk_init(pk_t *k)
{
    msgpack_sbuffer_init(&k->sb);
    msgpack_packer_init(&k->p, &k->sb, msgpack_sbuffer_write);
}

static void pk_free(pk_t *k)
{
    msgpack_sbuffer_destroy(&k->sb);
}

static void pk_map(pk_t *k, size_t n)
{
    assert_int_equal(msgpack_pack_map(&k->p, n), 0);
}

static void pk_array(pk_t *k, size_t n)
{
    assert_int_equal(msgpack_pack_array(&k->p, n), 0);
}

static void pk_str(pk_t *k, const char *s)
{
    assert_int_equal(msgpack_pack_str_with_body(&k->p, s, strlen(s)), 0);
}

static void pk_strn(pk_t *k, const void *s, size_t n)
{
    assert_int_equal(msgpack_pack_str_with_body(&k->p, s, n), 0);
}

static void pk_bin(pk_t *k, const void *s, size_t n)
{
    assert_int_equal(msgpack_pack_bin_with_body(&k->p, s, n), 0);
}

static void pk_uint(pk_t *k, uint64_t v)
{
    assert_int_equal(msgpack_pack_uint64(&k->p, v), 0);
}

static void pk_nil(pk_t *k)
{
    assert_int_equal(msgpack_pack_nil(&k->p), 0);
}

static void pk_raw(pk_t *k, const void *p, size_t n)
{
    assert_int_equal(msgpack_sbuffer_write(&k->sb, p, n), 0);
}

static void pk_kv_str(pk_t *k, const char *key, const char *val)
{
    pk_str(k, key);
    pk_str(k, val);
}

static void pk_kv_uint(pk_t *k, const char *key, uint64_t v)
{
    pk_str(k, key);
    pk_uint(k, v);
}

/* ---- helpers: decoding -------------------------------------------------- */

typedef struct dec {
    uint8_t *buf; /* exact-size heap copy of the input; the message borrows it */
    size_t len;
    proto_msg_t m;
    int rc;
} dec_t;

static bool in_buf(const dec_t *d, proto_bytes_t b)
{
    if (b.len == 0)
        return true;
    return b.ptr >= d->buf && b.len <= d->len && b.ptr - d->buf <= (ptrdiff_t)(d->len - b.len);
}

/* Every borrowed pointer of a decoded message lies inside the input. */
static bool msg_in_buf(const dec_t *d)
{
    const proto_msg_t *m = &d->m;
    bool ok = in_buf(d, m->stream) && in_buf(d, m->token) && in_buf(d, m->session) &&
              in_buf(d, m->resume_token) && in_buf(d, m->client) && in_buf(d, m->payload) &&
              in_buf(d, m->msgid) && in_buf(d, m->headers_raw);
    for (size_t i = 0; ok && i < m->n_headers; i++)
        ok = in_buf(d, m->headers[i].key) && in_buf(d, m->headers[i].value);
    return ok && (m->n_headers == 0) == (m->headers == NULL);
}

static int dec_run(dec_t *d, const void *data, size_t len, const proto_limits_t *lim)
{
    memset(d, 0, sizeof(*d));
    d->len = len;
    d->buf = malloc(len ? len : 1);
    assert_non_null(d->buf);
    if (len)
        memcpy(d->buf, data, len);
    /* a pattern the error path must overwrite */
    memset(&d->m, 0xa5, sizeof(d->m));
    d->rc = proto_decode(d->buf, len, lim, &d->m);
    if (d->rc == PROTO_OK) {
        assert_true(msg_in_buf(d));
    } else {
        /* only type, id and a terminated reason; nothing to free */
        assert_non_null(memchr(d->m.error, 0, sizeof(d->m.error)));
        assert_true(d->m.error[0] != 0);
        assert_null(d->m.headers);
        assert_int_equal(d->m.n_headers, 0);
        assert_null(d->m.stream.ptr);
        if (d->m.type == 0)
            assert_true(d->m.id == 0);
    }
    return d->rc;
}

static void dec_done(dec_t *d)
{
    if (d->rc == PROTO_OK)
        proto_msg_free(&d->m);
    free(d->buf);
    d->buf = NULL;
}

/* Decode and discard; returns the code. */
static int decode_rc(const void *data, size_t len, const proto_limits_t *lim)
{
    dec_t d;
    int rc = dec_run(&d, data, len, lim);
    dec_done(&d);
    return rc;
}

static int decode_pk(pk_t *k, const proto_limits_t *lim)
{
    return decode_rc(k->sb.data, k->sb.size, lim);
}

static void assert_bytes(proto_bytes_t b, const void *want, size_t n)
{
    assert_int_equal(b.len, n);
    if (n)
        assert_memory_equal(b.ptr, want, n);
}

static void assert_bytes_str(proto_bytes_t b, const char *want)
{
    assert_bytes(b, want, strlen(want));
}

/* ---- helpers: reading server messages ----------------------------------- */

typedef struct unp {
    msgpack_unpacked u;
    const msgpack_object *map;
} unp_t;

/* Unpack exactly one map from data[0..len) with msgpack-c. */
static void unp_one(unp_t *r, const uint8_t *data, size_t len)
{
    size_t off = 0;
    msgpack_unpacked_init(&r->u);
    assert_int_equal(msgpack_unpack_next(&r->u, (const char *)data, len, &off),
                     MSGPACK_UNPACK_SUCCESS);
    assert_int_equal(off, len);
    assert_int_equal(r->u.data.type, MSGPACK_OBJECT_MAP);
    r->map = &r->u.data;
}

static void unp_done(unp_t *r)
{
    msgpack_unpacked_destroy(&r->u);
}

static const msgpack_object *get(const unp_t *r, const char *key)
{
    const msgpack_object_map *m = &r->map->via.map;
    for (uint32_t i = 0; i < m->size; i++) {
        const msgpack_object *k = &m->ptr[i].key;
        assert_int_equal(k->type, MSGPACK_OBJECT_STR);
        if (k->via.str.size == strlen(key) && memcmp(k->via.str.ptr, key, k->via.str.size) == 0)
            return &m->ptr[i].val;
    }
    return NULL;
}

static void assert_entries(const unp_t *r, uint32_t n)
{
    assert_int_equal(r->map->via.map.size, n);
}

static void assert_str_field(const unp_t *r, const char *key, const void *want, size_t n)
{
    const msgpack_object *o = get(r, key);
    assert_non_null(o);
    assert_int_equal(o->type, MSGPACK_OBJECT_STR);
    assert_int_equal(o->via.str.size, n);
    if (n)
        assert_memory_equal(o->via.str.ptr, want, n);
}

static void assert_cstr_field(const unp_t *r, const char *key, const char *want)
{
    assert_str_field(r, key, want, strlen(want));
}

static void assert_uint_field(const unp_t *r, const char *key, uint64_t want)
{
    const msgpack_object *o = get(r, key);
    assert_non_null(o);
    assert_int_equal(o->type, MSGPACK_OBJECT_POSITIVE_INTEGER);
    assert_true(o->via.u64 == want);
}

static void assert_bool_field(const unp_t *r, const char *key, bool want)
{
    const msgpack_object *o = get(r, key);
    assert_non_null(o);
    assert_int_equal(o->type, MSGPACK_OBJECT_BOOLEAN);
    assert_int_equal(o->via.boolean, want);
}

/* welcome.subs: an array of {stream, epoch, acked, next} in the given order */
static void assert_resumed_subs(const unp_t *r, const proto_resumed_sub_t *want, size_t n)
{
    const msgpack_object *o = get(r, "subs");
    assert_non_null(o);
    assert_int_equal(o->type, MSGPACK_OBJECT_ARRAY);
    assert_int_equal(o->via.array.size, n);
    for (size_t i = 0; i < n; i++) {
        const msgpack_object *e = &o->via.array.ptr[i];
        assert_int_equal(e->type, MSGPACK_OBJECT_MAP);
        unp_t sub = {.map = e};
        assert_entries(&sub, 4);
        assert_str_field(&sub, "stream", want[i].stream, want[i].stream_len);
        assert_uint_field(&sub, "epoch", want[i].epoch);
        assert_uint_field(&sub, "acked", want[i].acked);
        assert_uint_field(&sub, "next", want[i].next);
    }
}

static void assert_type(const unp_t *r, const char *t)
{
    assert_cstr_field(r, "t", t);
    /* "t" is written first, so a reader may dispatch on the first entry */
    const msgpack_object *k = &r->map->via.map.ptr[0].key;
    assert_int_equal(k->via.str.size, 1);
    assert_int_equal(k->via.str.ptr[0], 't');
}

static const uint8_t S1[] = "chat.room42";
#define S1_LEN (sizeof(S1) - 1)

/* ---- encoders ----------------------------------------------------------- */

static void test_enc_welcome(void **state)
{
    (void)state;
    proto_buf_t b = {0};
    unp_t r;
    proto_welcome_t w = {.session = "s-1",
                         .resume_token = "rt-xyz",
                         .server = "arqd/0.1.0",
                         .max_payload = 1048576,
                         .max_inflight = 1024,
                         .session_ttl_s = 86400};
    assert_int_equal(proto_enc_welcome(&b, &w), 0);
    unp_one(&r, b.data, b.len);
    assert_entries(&r, 8);
    assert_type(&r, "welcome");
    assert_cstr_field(&r, "session", "s-1");
    assert_cstr_field(&r, "resume_token", "rt-xyz");
    assert_bool_field(&r, "resumed", false);
    assert_uint_field(&r, "session_ttl", 86400);
    assert_cstr_field(&r, "server", "arqd/0.1.0");
    assert_uint_field(&r, "max_payload", 1048576);
    assert_uint_field(&r, "max_inflight", 1024);
    unp_done(&r);

    /* resumed: the restored subscriptions follow */
    proto_buf_reset(&b);
    proto_resumed_sub_t subs[2] = {{"a.b", 3, 7, 10, 12}, {"c", 1, 9, 0, 1}};
    w.resumed = 1;
    w.subs = subs;
    w.n_subs = 2;
    assert_int_equal(proto_enc_welcome(&b, &w), 0);
    unp_one(&r, b.data, b.len);
    assert_entries(&r, 9);
    assert_type(&r, "welcome");
    assert_cstr_field(&r, "session", "s-1");
    assert_cstr_field(&r, "resume_token", "rt-xyz");
    assert_bool_field(&r, "resumed", true);
    assert_uint_field(&r, "session_ttl", 86400);
    assert_cstr_field(&r, "server", "arqd/0.1.0");
    assert_uint_field(&r, "max_payload", 1048576);
    assert_uint_field(&r, "max_inflight", 1024);
    assert_resumed_subs(&r, subs, 2);
    unp_done(&r);

    /* a session the WAL could not store says so */
    proto_buf_reset(&b);
    w.resumed = 0;
    w.ephemeral = 1;
    assert_int_equal(proto_enc_welcome(&b, &w), 0);
    unp_one(&r, b.data, b.len);
    assert_entries(&r, 9);
    assert_type(&r, "welcome");
    assert_cstr_field(&r, "session", "s-1");
    assert_cstr_field(&r, "resume_token", "rt-xyz");
    assert_bool_field(&r, "resumed", false);
    assert_uint_field(&r, "session_ttl", 86400);
    assert_cstr_field(&r, "server", "arqd/0.1.0");
    assert_uint_field(&r, "max_payload", 1048576);
    assert_uint_field(&r, "max_inflight", 1024);
    assert_bool_field(&r, "durable", false);
    unp_done(&r);

    proto_buf_reset(&b);
    proto_welcome_t w2 = {.resume_token = "", .server = "x", .max_payload = UINT32_MAX};
    assert_int_equal(proto_enc_welcome(&b, &w2), 0);
    unp_one(&r, b.data, b.len);
    assert_cstr_field(&r, "session", "");
    assert_cstr_field(&r, "resume_token", "");
    assert_uint_field(&r, "max_payload", UINT32_MAX);
    assert_uint_field(&r, "max_inflight", 0);
    unp_done(&r);
    proto_buf_free(&b);
    assert_null(b.data);
}

static void test_enc_subok_unsubok(void **state)
{
    (void)state;
    proto_buf_t b = {0};
    unp_t r;
    assert_int_equal(proto_enc_subok(&b, 7, S1, S1_LEN, 0xdeadbeefcafe, 1, UINT64_MAX), 0);
    unp_one(&r, b.data, b.len);
    assert_entries(&r, 6);
    assert_type(&r, "subok");
    assert_uint_field(&r, "id", 7);
    assert_str_field(&r, "stream", S1, S1_LEN);
    assert_uint_field(&r, "epoch", 0xdeadbeefcafe);
    assert_uint_field(&r, "first", 1);
    assert_uint_field(&r, "next", UINT64_MAX);
    unp_done(&r);

    proto_buf_reset(&b);
    assert_int_equal(proto_enc_unsubok(&b, UINT64_MAX, S1, S1_LEN), 0);
    unp_one(&r, b.data, b.len);
    assert_entries(&r, 3);
    assert_type(&r, "unsubok");
    assert_uint_field(&r, "id", UINT64_MAX);
    assert_str_field(&r, "stream", S1, S1_LEN);
    unp_done(&r);
    proto_buf_free(&b);
}

static void test_enc_puback(void **state)
{
    (void)state;
    for (int dup = 0; dup < 2; dup++) {
        proto_buf_t b = {0};
        unp_t r;
        assert_int_equal(proto_enc_puback(&b, 42, S1, S1_LEN, 1234567, dup ? 5 : 0), 0);
        unp_one(&r, b.data, b.len);
        assert_entries(&r, 5);
        assert_type(&r, "puback");
        assert_uint_field(&r, "id", 42);
        assert_str_field(&r, "stream", S1, S1_LEN);
        assert_uint_field(&r, "offset", 1234567);
        const msgpack_object *o = get(&r, "dup");
        assert_non_null(o);
        assert_int_equal(o->type, MSGPACK_OBJECT_BOOLEAN);
        assert_int_equal(o->via.boolean, dup);
        unp_done(&r);
        proto_buf_free(&b);
    }
}

static void test_enc_nack_error(void **state)
{
    (void)state;
    proto_buf_t b = {0};
    unp_t r;
    assert_int_equal(proto_enc_nack(&b, 9, PROTO_CODE_UNAVAILABLE, "storage full"), 0);
    unp_one(&r, b.data, b.len);
    assert_entries(&r, 4);
    assert_type(&r, "nack");
    assert_uint_field(&r, "id", 9);
    assert_uint_field(&r, "code", 503);
    assert_cstr_field(&r, "reason", "storage full");
    unp_done(&r);

    proto_buf_reset(&b);
    assert_int_equal(proto_enc_error(&b, 0, PROTO_CODE_BAD_REQUEST, "malformed message"), 0);
    unp_one(&r, b.data, b.len);
    assert_entries(&r, 3);
    assert_type(&r, "error");
    assert_null(get(&r, "id")); /* id 0: not tied to a request */
    assert_uint_field(&r, "code", 400);
    assert_cstr_field(&r, "reason", "malformed message");
    unp_done(&r);

    proto_buf_reset(&b);
    assert_int_equal(proto_enc_error(&b, 77, PROTO_CODE_CONFLICT, NULL), 0);
    unp_one(&r, b.data, b.len);
    assert_entries(&r, 4);
    assert_uint_field(&r, "id", 77);
    assert_uint_field(&r, "code", 409);
    assert_cstr_field(&r, "reason", "");
    unp_done(&r);
    proto_buf_free(&b);
}

static void test_enc_msg(void **state)
{
    (void)state;
    proto_buf_t b = {0};
    unp_t r;
    pk_t h;
    pk_init(&h);
    pk_map(&h, 2);
    pk_kv_str(&h, "content-type", "text/plain");
    pk_kv_str(&h, "trace", "abc");

    static const uint8_t payload[] = {0, 1, 2, 0xff, 0xc1};
    assert_int_equal(proto_enc_msg(&b, S1, S1_LEN, 99, 1700000000123456, (uint8_t *)h.sb.data,
                                   h.sb.size, payload, sizeof(payload)),
                     0);
    unp_one(&r, b.data, b.len);
    assert_entries(&r, 6);
    assert_type(&r, "msg");
    assert_str_field(&r, "stream", S1, S1_LEN);
    assert_uint_field(&r, "offset", 99);
    assert_uint_field(&r, "ts", 1700000000123456);
    const msgpack_object *o = get(&r, "payload");
    assert_non_null(o);
    assert_int_equal(o->type, MSGPACK_OBJECT_BIN);
    assert_int_equal(o->via.bin.size, sizeof(payload));
    assert_memory_equal(o->via.bin.ptr, payload, sizeof(payload));
    o = get(&r, "headers");
    assert_non_null(o);
    assert_int_equal(o->type, MSGPACK_OBJECT_MAP);
    assert_int_equal(o->via.map.size, 2);
    /* spliced byte for byte */
    assert_non_null(memmem(b.data, b.len, h.sb.data, h.sb.size));
    unp_done(&r);

    /* no headers, empty payload, a clock before 1970 */
    proto_buf_reset(&b);
    assert_int_equal(proto_enc_msg(&b, S1, S1_LEN, 1, -5, NULL, 0, NULL, 0), 0);
    unp_one(&r, b.data, b.len);
    assert_entries(&r, 5);
    assert_null(get(&r, "headers"));
    assert_uint_field(&r, "ts", 0);
    o = get(&r, "payload");
    assert_non_null(o);
    assert_int_equal(o->type, MSGPACK_OBJECT_BIN);
    assert_int_equal(o->via.bin.size, 0);
    unp_done(&r);

    /* a full-size payload */
    size_t big = 1024 * 1024;
    uint8_t *p = malloc(big);
    assert_non_null(p);
    for (size_t i = 0; i < big; i++)
        p[i] = (uint8_t)(i * 7);
    proto_buf_reset(&b);
    assert_int_equal(proto_enc_msg(&b, S1, S1_LEN, 2, 3, NULL, 0, p, big), 0);
    unp_one(&r, b.data, b.len);
    o = get(&r, "payload");
    assert_int_equal(o->via.bin.size, big);
    assert_memory_equal(o->via.bin.ptr, p, big);
    unp_done(&r);
    free(p);
    pk_free(&h);
    proto_buf_free(&b);
}

/* headers_raw must be exactly one flat map; anything else is refused and the
 * buffer is left as it was. */
static void test_enc_msg_bad_headers(void **state)
{
    (void)state;
    static const struct {
        const char *what;
        uint8_t bytes[8];
        size_t len;
    } bad[] = {
        {"array", {0x91, 0x01}, 2},
        {"str", {0xa1, 'x'}, 2},
        {"truncated map", {0x81, 0xa1, 'k'}, 3},
        {"trailing byte", {0x80, 0x00}, 2},
        {"nested", {0x81, 0xa1, 'k', 0x90}, 4},
        {"0xc1", {0xc1}, 1},
        {"int value", {0x81, 0xa1, 'k', 0x01}, 4},
        {"bin key", {0x81, 0xc4, 0x01, 'k', 0xa0}, 5},
    };
    proto_buf_t b = {0};
    assert_int_equal(proto_enc_gap(&b, S1, S1_LEN, 1, 2), 0);
    size_t before = b.len;
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        assert_int_equal(
            proto_enc_msg(&b, S1, S1_LEN, 1, 1, bad[i].bytes, bad[i].len, (const uint8_t *)"x", 1),
            PROTO_EMALFORMED);
        assert_int_equal(b.len, before);
    }
    assert_int_equal(proto_enc_msg(&b, S1, S1_LEN, 1, 1, NULL, 3, NULL, 0), PROTO_EMALFORMED);
    proto_buf_free(&b);
}

static void test_enc_gap_and_append(void **state)
{
    (void)state;
    proto_buf_t b = {0};
    /* encoders append: several messages in one buffer, read back in order */
    assert_int_equal(proto_enc_gap(&b, S1, S1_LEN, 3, 17), 0);
    size_t first = b.len;
    assert_int_equal(proto_enc_puback(&b, 1, S1, S1_LEN, 18, 0), 0);
    for (int i = 0; i < 100; i++)
        assert_int_equal(proto_enc_unsubok(&b, (uint64_t)i, S1, S1_LEN), 0);

    unp_t r;
    unp_one(&r, b.data, first);
    assert_entries(&r, 4);
    assert_type(&r, "gap");
    assert_str_field(&r, "stream", S1, S1_LEN);
    assert_uint_field(&r, "from", 3);
    assert_uint_field(&r, "to", 17);
    unp_done(&r);

    size_t off = 0;
    int n = 0;
    msgpack_unpacked u;
    msgpack_unpacked_init(&u);
    while (off < b.len) {
        assert_int_equal(msgpack_unpack_next(&u, (const char *)b.data, b.len, &off),
                         MSGPACK_UNPACK_SUCCESS);
        n++;
    }
    assert_int_equal(off, b.len);
    assert_int_equal(n, 102);
    msgpack_unpacked_destroy(&u);
    proto_buf_free(&b);
}

/* Run one encoder with the Nth allocation failing, for N = 0, 1, ... until
 * it succeeds: every failure is PROTO_ENOMEM and leaves the buffer exactly
 * as it was (earlier messages intact, no half message appended). */
static void test_enc_enomem(void **state)
{
    (void)state;
    char big[600];
    memset(big, 's', sizeof(big) - 1);
    big[sizeof(big) - 1] = '\0';
    uint8_t *payload = malloc(5000);
    assert_non_null(payload);
    memset(payload, 0xab, 5000);
    pk_t h;
    pk_init(&h);
    pk_map(&h, 1);
    pk_kv_str(&h, "k", big);

    for (int which = 0; which < 8; which++) {
        for (int prefill = 0; prefill < 2; prefill++) {
            int rc = PROTO_ENOMEM;
            for (long n = 0; rc == PROTO_ENOMEM; n++) {
                assert_true(n < 100);
                proto_buf_t b = {0};
                if (prefill)
                    assert_int_equal(proto_enc_gap(&b, S1, S1_LEN, 1, 2), 0);
                size_t before = b.len;
                uint8_t saved[64];
                assert_true(before <= sizeof(saved));
                if (before)
                    memcpy(saved, b.data, before);

                alloc_budget = n;
                switch (which) {
                case 0: {
                    proto_resumed_sub_t rs = {big, strlen(big), 1, 2, 3};
                    proto_welcome_t w = {.session = big,
                                         .resume_token = big,
                                         .server = big,
                                         .max_payload = 1,
                                         .max_inflight = 2,
                                         .resumed = 1,
                                         .subs = &rs,
                                         .n_subs = 1};
                    rc = proto_enc_welcome(&b, &w);
                } break;
                case 1:
                    rc = proto_enc_subok(&b, 1, (const uint8_t *)big, strlen(big), 2, 3, 4);
                    break;
                case 2:
                    rc = proto_enc_unsubok(&b, 1, (const uint8_t *)big, strlen(big));
                    break;
                case 3:
                    rc = proto_enc_puback(&b, 1, (const uint8_t *)big, strlen(big), 2, 1);
                    break;
                case 4:
                    rc = proto_enc_nack(&b, 1, 503, big);
                    break;
                case 5:
                    rc = proto_enc_msg(&b, S1, S1_LEN, 1, 2, (const uint8_t *)h.sb.data, h.sb.size,
                                       payload, 5000);
                    break;
                case 6:
                    rc = proto_enc_gap(&b, (const uint8_t *)big, strlen(big), 1, 2);
                    break;
                default:
                    rc = proto_enc_error(&b, 0, 400, big);
                    break;
                }
                alloc_budget = -1;
                if (rc == PROTO_OK) {
                    unp_t r;
                    unp_one(&r, b.data + before, b.len - before);
                    unp_done(&r);
                } else {
                    assert_int_equal(rc, PROTO_ENOMEM);
                    assert_int_equal(b.len, before);
                }
                if (before)
                    assert_memory_equal(b.data, saved, before);
                proto_buf_free(&b);
            }
        }
    }
    pk_free(&h);
    free(payload);
}

/* ---- decoding valid client messages -------------------------------------- */

static void test_dec_hello(void **state)
{
    (void)state;
    dec_t d;
    pk_t k;

    pk_init(&k);
    pk_map(&k, 1);
    pk_kv_str(&k, "t", "hello");
    assert_int_equal(dec_run(&d, k.sb.data, k.sb.size, NULL), 0);
    assert_int_equal(d.m.type, PROTO_HELLO);
    assert_int_equal(d.m.token.len, 0);
    assert_int_equal(d.m.session.len, 0);
    assert_int_equal(d.m.resume_token.len, 0);
    assert_int_equal(d.m.client.len, 0);
    assert_int_equal(d.m.id, 0);
    assert_null(d.m.headers);
    dec_done(&d);
    pk_free(&k);

    /* every field, "t" last, unknown keys of every shape skipped */
    pk_init(&k);
    pk_map(&k, 9);
    pk_kv_str(&k, "token", "eyJhbGciOiJIUzI1NiJ9.e30.sig");
    pk_kv_str(&k, "session", "s-1");
    pk_str(&k, "future");
    pk_map(&k, 2);
    pk_kv_uint(&k, "a", 1);
    pk_str(&k, "b");
    pk_array(&k, 3);
    pk_nil(&k);
    assert_int_equal(msgpack_pack_double(&k.p, 1.5), 0);
    assert_int_equal(msgpack_pack_ext_with_body(&k.p, "abcd", 4, 7), 0);
    pk_kv_str(&k, "resume_token", "rt");
    pk_str(&k, "ext32");
    assert_int_equal(msgpack_pack_ext_with_body(&k.p, "0123456789abcdefXYZ", 19, -1), 0);
    pk_kv_str(&k, "client", "arq-js/1.0");
    pk_str(&k, "f");
    assert_int_equal(msgpack_pack_float(&k.p, 2.5f), 0);
    pk_str(&k, "neg");
    assert_int_equal(msgpack_pack_int64(&k.p, INT64_MIN), 0);
    pk_kv_str(&k, "t", "hello");
    assert_int_equal(dec_run(&d, k.sb.data, k.sb.size, NULL), 0);
    assert_int_equal(d.m.type, PROTO_HELLO);
    assert_bytes_str(d.m.token, "eyJhbGciOiJIUzI1NiJ9.e30.sig");
    assert_bytes_str(d.m.session, "s-1");
    assert_bytes_str(d.m.resume_token, "rt");
    assert_bytes_str(d.m.client, "arq-js/1.0");
    dec_done(&d);
    pk_free(&k);

    /* nil optional fields are absent; fields of other types are ignored */
    pk_init(&k);
    pk_map(&k, 4);
    pk_kv_str(&k, "t", "hello");
    pk_str(&k, "token");
    pk_nil(&k);
    pk_str(&k, "payload");
    pk_uint(&k, 5);
    pk_str(&k, "id");
    pk_str(&k, "not an id");
    assert_int_equal(dec_run(&d, k.sb.data, k.sb.size, NULL), 0);
    assert_int_equal(d.m.token.len, 0);
    assert_int_equal(d.m.id, 0);
    dec_done(&d);
    pk_free(&k);
}

static void pack_sub(pk_t *k, int from_kind, uint64_t off, int with_epoch)
{
    pk_init(k);
    pk_map(k, with_epoch ? 5 : 4);
    pk_kv_str(k, "t", "sub");
    pk_kv_uint(k, "id", 3);
    pk_kv_str(k, "stream", "orders.eu");
    pk_str(k, "from");
    if (from_kind == 0)
        pk_str(k, "earliest");
    else if (from_kind == 1)
        pk_str(k, "latest");
    else
        pk_uint(k, off);
    if (with_epoch)
        pk_kv_uint(k, "epoch", 0x1122334455667788ull);
}

static void test_dec_sub(void **state)
{
    (void)state;
    static const enum proto_from want[] = {PROTO_FROM_EARLIEST, PROTO_FROM_LATEST,
                                           PROTO_FROM_OFFSET};
    static const uint64_t offsets[] = {1, 127, 128, 65536, UINT64_MAX};
    for (int kind = 0; kind < 3; kind++) {
        for (size_t o = 0; o < (kind == 2 ? 5u : 1u); o++) {
            for (int ep = 0; ep < 2; ep++) {
                pk_t k;
                dec_t d;
                pack_sub(&k, kind, offsets[o], ep);
                assert_int_equal(dec_run(&d, k.sb.data, k.sb.size, NULL), 0);
                assert_int_equal(d.m.type, PROTO_SUB);
                assert_int_equal(d.m.id, 3);
                assert_bytes_str(d.m.stream, "orders.eu");
                assert_int_equal(d.m.from, want[kind]);
                assert_true(d.m.offset == (kind == 2 ? offsets[o] : 0));
                assert_true(d.m.epoch == (ep ? 0x1122334455667788ull : 0));
                dec_done(&d);
                pk_free(&k);
            }
        }
    }
}

static void test_dec_unsub_ack(void **state)
{
    (void)state;
    pk_t k;
    dec_t d;
    pk_init(&k);
    pk_map(&k, 3);
    pk_kv_str(&k, "stream", "a");
    pk_kv_uint(&k, "id", 12);
    pk_kv_str(&k, "t", "unsub");
    assert_int_equal(dec_run(&d, k.sb.data, k.sb.size, NULL), 0);
    assert_int_equal(d.m.type, PROTO_UNSUB);
    assert_int_equal(d.m.id, 12);
    assert_bytes_str(d.m.stream, "a");
    dec_done(&d);
    pk_free(&k);

    pk_init(&k);
    pk_map(&k, 3);
    pk_kv_str(&k, "t", "ack");
    pk_kv_str(&k, "stream", "chat.room42");
    pk_kv_uint(&k, "offset", 5000000000ull);
    assert_int_equal(dec_run(&d, k.sb.data, k.sb.size, NULL), 0);
    assert_int_equal(d.m.type, PROTO_ACK);
    assert_int_equal(d.m.id, 0);
    assert_bytes_str(d.m.stream, "chat.room42");
    assert_true(d.m.offset == 5000000000ull);
    dec_done(&d);
    pk_free(&k);
}

static void test_dec_pub(void **state)
{
    (void)state;
    static const uint8_t payload[] = {0x00, 0xc1, 0xff, 'h', 'i'};
    for (int variant = 0; variant < 4; variant++) {
        /* 0: bin payload, all fields; 1: str payload, no optional fields;
         * 2: empty headers map, empty payload; 3: nil msgid and headers */
        pk_t k, h;
        dec_t d;
        pk_init(&k);
        pk_init(&h);
        pk_map(&h, 3);
        pk_kv_str(&h, "content-type", "application/json");
        pk_kv_str(&h, "x-trace", "00-abc-01");
        pk_kv_str(&h, "\xc3\xa9t\xc3\xa9", ""); /* UTF-8 key, empty value */

        pk_map(&k, variant == 1 ? 4 : 6);
        pk_kv_str(&k, "t", "pub");
        pk_kv_uint(&k, "id", 1000);
        pk_kv_str(&k, "stream", "chat.room42");
        pk_str(&k, "payload");
        if (variant == 0)
            pk_bin(&k, payload, sizeof(payload));
        else if (variant == 1)
            pk_str(&k, "{\"text\":\"hi\"}");
        else
            pk_bin(&k, "", 0);
        if (variant == 0) {
            pk_kv_str(&k, "msgid", "m-000001");
            pk_str(&k, "headers");
            pk_raw(&k, h.sb.data, h.sb.size);
        } else if (variant == 2) {
            pk_kv_str(&k, "msgid", "m-2");
            pk_str(&k, "headers");
            pk_map(&k, 0);
        } else if (variant == 3) {
            pk_str(&k, "msgid");
            pk_nil(&k);
            pk_str(&k, "headers");
            pk_nil(&k);
        }
        assert_int_equal(dec_run(&d, k.sb.data, k.sb.size, NULL), 0);
        assert_int_equal(d.m.type, PROTO_PUB);
        assert_int_equal(d.m.id, 1000);
        assert_bytes_str(d.m.stream, "chat.room42");
        switch (variant) {
        case 0:
            assert_bytes(d.m.payload, payload, sizeof(payload));
            assert_bytes_str(d.m.msgid, "m-000001");
            assert_int_equal(d.m.n_headers, 3);
            assert_bytes_str(d.m.headers[0].key, "content-type");
            assert_bytes_str(d.m.headers[0].value, "application/json");
            assert_bytes_str(d.m.headers[1].key, "x-trace");
            assert_bytes_str(d.m.headers[1].value, "00-abc-01");
            assert_bytes_str(d.m.headers[2].key, "\xc3\xa9t\xc3\xa9");
            assert_int_equal(d.m.headers[2].value.len, 0);
            /* headers_raw is the map exactly as sent, inside the input */
            assert_bytes(d.m.headers_raw, h.sb.data, h.sb.size);
            assert_ptr_equal(d.m.headers_raw.ptr, memmem(d.buf, d.len, h.sb.data, h.sb.size));
            /* borrowed, not copied */
            assert_true(d.m.payload.ptr > d.buf && d.m.payload.ptr < d.buf + d.len);
            break;
        case 1:
            assert_bytes_str(d.m.payload, "{\"text\":\"hi\"}");
            assert_int_equal(d.m.msgid.len, 0);
            assert_null(d.m.headers);
            assert_int_equal(d.m.headers_raw.len, 0);
            break;
        case 2:
            assert_int_equal(d.m.payload.len, 0);
            assert_bytes_str(d.m.msgid, "m-2");
            assert_null(d.m.headers); /* {} is no headers */
            assert_int_equal(d.m.n_headers, 0);
            assert_int_equal(d.m.headers_raw.len, 0);
            break;
        default:
            assert_int_equal(d.m.msgid.len, 0);
            assert_null(d.m.headers);
            break;
        }
        /* a decoded pub re-encodes as a msg that msgpack-c reads back */
        proto_buf_t b = {0};
        unp_t r;
        assert_int_equal(proto_enc_msg(&b, d.m.stream.ptr, d.m.stream.len, 1, 1,
                                       d.m.headers_raw.ptr, d.m.headers_raw.len, d.m.payload.ptr,
                                       d.m.payload.len),
                         0);
        unp_one(&r, b.data, b.len);
        assert_entries(&r, variant == 0 ? 6 : 5);
        unp_done(&r);
        proto_buf_free(&b);
        dec_done(&d);
        pk_free(&k);
        pk_free(&h);
    }
}

/* pub's ack: absent (the server's default), "local", "replicated"; nil is absent. */
static void test_dec_pub_ack(void **state)
{
    (void)state;
    static const char *const values[] = {NULL, "local", "replicated", "nil"};
    static const enum proto_ack want[] = {PROTO_ACK_DEFAULT, PROTO_ACK_LOCAL, PROTO_ACK_REPLICATED,
                                          PROTO_ACK_DEFAULT};
    for (size_t i = 0; i < 4; i++) {
        pk_t k;
        dec_t d;
        pk_init(&k);
        pk_map(&k, values[i] ? 5 : 4);
        pk_kv_str(&k, "t", "pub");
        pk_kv_uint(&k, "id", 7);
        pk_kv_str(&k, "stream", "s");
        pk_kv_str(&k, "payload", "x");
        if (values[i] && strcmp(values[i], "nil") == 0) {
            pk_str(&k, "ack");
            pk_nil(&k);
        } else if (values[i]) {
            pk_kv_str(&k, "ack", values[i]);
        }
        assert_int_equal(dec_run(&d, k.sb.data, k.sb.size, NULL), 0);
        assert_int_equal(d.m.ack, want[i]);
        dec_done(&d);
        pk_free(&k);
    }
}

/* Every msgpack integer format is accepted for ids and offsets if its value
 * is >= 0; negative values and floats are not. */
static void test_dec_int_formats(void **state)
{
    (void)state;
    static const struct {
        uint8_t bytes[9];
        size_t len;
        int rc;
        uint64_t value;
    } cases[] = {
        {{0x00}, 1, 0, 0},
        {{0x7f}, 1, 0, 127},
        {{0xcc, 0xff}, 2, 0, 255},
        {{0xcd, 0x01, 0x00}, 3, 0, 256},
        {{0xce, 0xff, 0xff, 0xff, 0xff}, 5, 0, 0xffffffffu},
        {{0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff}, 9, 0, UINT64_MAX},
        {{0xcf, 0, 0, 0, 0, 0, 0, 0, 5}, 9, 0, 5}, /* non-minimal */
        {{0xd0, 0x05}, 2, 0, 5},
        {{0xd1, 0x7f, 0xff}, 3, 0, 0x7fff},
        {{0xd2, 0x00, 0x01, 0x00, 0x00}, 5, 0, 65536},
        {{0xd3, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff}, 9, 0, INT64_MAX},
        {{0xff}, 1, PROTO_ETYPE, 0},
        {{0xe0}, 1, PROTO_ETYPE, 0},
        {{0xd0, 0x80}, 2, PROTO_ETYPE, 0},
        {{0xd1, 0xff, 0xff}, 3, PROTO_ETYPE, 0},
        {{0xd2, 0x80, 0, 0, 0}, 5, PROTO_ETYPE, 0},
        {{0xd3, 0x80, 0, 0, 0, 0, 0, 0, 0}, 9, PROTO_ETYPE, 0},
        {{0xca, 0x3f, 0x80, 0, 0}, 5, PROTO_ETYPE, 0},
        {{0xcb, 0x3f, 0xf0, 0, 0, 0, 0, 0, 0}, 9, PROTO_ETYPE, 0},
        {{0xc2}, 1, PROTO_ETYPE, 0},
        {{0xa1, '1'}, 2, PROTO_ETYPE, 0},
        {{0xc4, 0x01, 0x01}, 3, PROTO_ETYPE, 0},
        {{0x90}, 1, PROTO_ETYPE, 0},
        {{0xd4, 0x01, 0x01}, 3, PROTO_ETYPE, 0},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        for (int where = 0; where < 3; where++) {
            /* the same value as a pub id, an ack offset and a sub epoch */
            pk_t k;
            dec_t d;
            pk_init(&k);
            pk_map(&k, where == 0 ? 4 : where == 1 ? 3 : 5);
            pk_kv_str(&k, "t", where == 0 ? "pub" : where == 1 ? "ack" : "sub");
            pk_kv_str(&k, "stream", "s");
            if (where == 0)
                pk_kv_str(&k, "payload", "p");
            if (where == 2) {
                pk_kv_uint(&k, "id", 1);
                pk_kv_str(&k, "from", "latest");
            }
            pk_str(&k, where == 0 ? "id" : where == 1 ? "offset" : "epoch");
            pk_raw(&k, cases[i].bytes, cases[i].len);
            assert_int_equal(dec_run(&d, k.sb.data, k.sb.size, NULL), cases[i].rc);
            if (cases[i].rc == 0) {
                uint64_t got = where == 0 ? d.m.id : where == 1 ? d.m.offset : d.m.epoch;
                assert_true(got == cases[i].value);
            }
            dec_done(&d);
            pk_free(&k);
        }
    }
}

/* ---- hostile input ------------------------------------------------------ */

/* Declared lengths and counts far beyond the input are rejected up front,
 * at the top level and as the value of a key, before any allocation. */
static void test_dec_huge_declared(void **state)
{
    (void)state;
    static const struct {
        uint8_t bytes[8];
        size_t len;
    } heads[] = {
        {{0xdb, 0xff, 0xff, 0xff, 0xff}, 5},       /* str32 */
        {{0xda, 0xff, 0xff}, 3},                   /* str16 */
        {{0xd9, 0xff}, 2},                         /* str8 */
        {{0xbf}, 1},                               /* fixstr 31 */
        {{0xc6, 0xff, 0xff, 0xff, 0xff}, 5},       /* bin32 */
        {{0xc5, 0xff, 0xff}, 3},                   /* bin16 */
        {{0xc4, 0xff}, 2},                         /* bin8 */
        {{0xc9, 0xff, 0xff, 0xff, 0xff, 0x01}, 6}, /* ext32 */
        {{0xc8, 0xff, 0xff, 0x01}, 4},             /* ext16 */
        {{0xc7, 0xff, 0x01}, 3},                   /* ext8 */
        {{0xd8}, 1},                               /* fixext16 */
        {{0xdd, 0xff, 0xff, 0xff, 0xff}, 5},       /* array32 */
        {{0xdc, 0xff, 0xff}, 3},                   /* array16 */
        {{0x9f}, 1},                               /* fixarray 15 */
        {{0xdf, 0xff, 0xff, 0xff, 0xff}, 5},       /* map32 */
        {{0xde, 0xff, 0xff}, 3},                   /* map16 */
        {{0x8f}, 1},                               /* fixmap 15 */
        {{0xdf, 0x80, 0x00, 0x00, 0x00}, 5},       /* map32 2^31: 2n wraps in 32 bits */
        {{0xcf, 0xff}, 2},                         /* uint64 cut short */
        {{0xcb, 0x00}, 2},                         /* float64 cut short */
    };
    for (size_t i = 0; i < sizeof(heads) / sizeof(heads[0]); i++) {
        uint8_t buf[64];
        /* alone, and followed by a few bytes */
        assert_int_equal(decode_rc(heads[i].bytes, heads[i].len, NULL), PROTO_EMALFORMED);
        memcpy(buf, heads[i].bytes, heads[i].len);
        memset(buf + heads[i].len, 0, 8);
        assert_int_equal(decode_rc(buf, heads[i].len + 8, NULL), PROTO_EMALFORMED);

        /* as a value: {"t":"pub","payload":<head>...} */
        static const uint8_t pre[] = {0x82, 0xa1, 't', 0xa3, 'p', 'u', 'b', 0xa7,
                                      'p',  'a',  'y', 'l',  'o', 'a', 'd'};
        memcpy(buf, pre, sizeof(pre));
        memcpy(buf + sizeof(pre), heads[i].bytes, heads[i].len);
        assert_int_equal(decode_rc(buf, sizeof(pre) + heads[i].len, NULL), PROTO_EMALFORMED);
        memset(buf + sizeof(pre) + heads[i].len, 0x01, 16);
        assert_int_equal(decode_rc(buf, sizeof(pre) + heads[i].len + 16, NULL), PROTO_EMALFORMED);
        /* and as a key */
        static const uint8_t kpre[] = {0x81};
        memcpy(buf, kpre, 1);
        memcpy(buf + 1, heads[i].bytes, heads[i].len);
        assert_int_equal(decode_rc(buf, 1 + heads[i].len, NULL), PROTO_EMALFORMED);
    }

    /* a map declaring more entries than the bytes that follow could hold,
     * even if each were one byte: {"t":"hello"} with count 3 */
    static const uint8_t short_map[] = {0x83, 0xa1, 't', 0xa5, 'h', 'e', 'l', 'l', 'o'};
    assert_int_equal(decode_rc(short_map, sizeof(short_map), NULL), PROTO_EMALFORMED);
}

static void test_dec_deep_nesting(void **state)
{
    (void)state;
    const size_t depth = 10000;
    uint8_t *buf = malloc(depth * 3 + 16);
    assert_non_null(buf);

    /* [[[[...nil...]]]] */
    memset(buf, 0x91, depth);
    buf[depth] = 0xc0;
    assert_int_equal(decode_rc(buf, depth + 1, NULL), PROTO_EMALFORMED);
    /* {"k":{"k":{...}}} */
    for (size_t i = 0; i < depth; i++) {
        buf[i * 3] = 0x81;
        buf[i * 3 + 1] = 0xa1;
        buf[i * 3 + 2] = 'k';
    }
    buf[depth * 3] = 0xc0;
    assert_int_equal(decode_rc(buf, depth * 3 + 1, NULL), PROTO_EMALFORMED);
    /* and cut short */
    assert_int_equal(decode_rc(buf, depth * 3, NULL), PROTO_EMALFORMED);
    /* a caller asking for a huge max_depth still gets a bounded walk */
    proto_limits_t lim = {.max_depth = UINT32_MAX};
    assert_int_equal(decode_rc(buf, depth * 3 + 1, &lim), PROTO_EMALFORMED);
    free(buf);

    /* the limit itself: a hello with an unknown key holding n nested arrays
     * has depth n + 1 */
    for (uint32_t max = 1; max <= 10; max++) {
        for (uint32_t n = 0; n <= 10; n++) {
            pk_t k;
            pk_init(&k);
            pk_map(&k, 2);
            pk_kv_str(&k, "t", "hello");
            pk_str(&k, "x");
            for (uint32_t j = 0; j < n; j++)
                pk_array(&k, 1);
            pk_uint(&k, 1);
            proto_limits_t l = {.max_depth = max};
            assert_int_equal(decode_pk(&k, &l), n + 1 <= max ? PROTO_OK : PROTO_EMALFORMED);
            if (max == 8)
                assert_int_equal(decode_pk(&k, NULL), n + 1 <= 8 ? PROTO_OK : PROTO_EMALFORMED);
            pk_free(&k);
        }
    }
    /* empty containers count as a level too */
    static const uint8_t empty_nested[] = {0x82, 0xa1, 't',  0xa5, 'h',  'e', 'l',
                                           'l',  'o',  0xa1, 'x',  0x91, 0x90};
    proto_limits_t two = {.max_depth = 2};
    proto_limits_t three = {.max_depth = 3};
    assert_int_equal(decode_rc(empty_nested, sizeof(empty_nested), &two), PROTO_EMALFORMED);
    assert_int_equal(decode_rc(empty_nested, sizeof(empty_nested), &three), PROTO_OK);
}

/* One valid message of every type, with every optional field. */
static size_t build_samples(pk_t *s)
{
    size_t n = 0;
    pk_init(&s[n]);
    pk_map(&s[n], 5);
    pk_kv_str(&s[n], "t", "hello");
    pk_kv_str(&s[n], "token", "a.b.c");
    pk_kv_str(&s[n], "session", "s");
    pk_kv_str(&s[n], "resume_token", "r");
    pk_kv_str(&s[n], "client", "c/1");
    n++;
    pack_sub(&s[n++], 2, 300, 1);
    pack_sub(&s[n++], 0, 0, 0);
    pk_init(&s[n]);
    pk_map(&s[n], 3);
    pk_kv_str(&s[n], "t", "unsub");
    pk_kv_uint(&s[n], "id", 70000);
    pk_kv_str(&s[n], "stream", "x.y");
    n++;
    pk_init(&s[n]);
    pk_map(&s[n], 7);
    pk_kv_str(&s[n], "t", "pub");
    pk_kv_uint(&s[n], "id", 5);
    pk_kv_str(&s[n], "stream", "chat.room42");
    pk_str(&s[n], "payload");
    pk_bin(&s[n], "\x01\x02\x03hello", 8);
    pk_kv_str(&s[n], "msgid", "m1");
    pk_str(&s[n], "headers");
    pk_map(&s[n], 2);
    pk_kv_str(&s[n], "k1", "v1");
    pk_kv_str(&s[n], "k2", "v2");
    pk_str(&s[n], "x-unknown");
    pk_array(&s[n], 2);
    pk_uint(&s[n], 1);
    pk_map(&s[n], 0);
    n++;
    pk_init(&s[n]);
    pk_map(&s[n], 3);
    pk_kv_str(&s[n], "t", "ack");
    pk_kv_str(&s[n], "stream", "chat.room42");
    pk_kv_uint(&s[n], "offset", 1u << 20);
    n++;
    return n;
}

#define N_SAMPLES 6

/* Every proper prefix of a valid message (including the empty one) is
 * incomplete msgpack; so is every message with a byte appended. */
static void test_dec_truncation_trailing(void **state)
{
    (void)state;
    pk_t s[N_SAMPLES];
    size_t n = build_samples(s);
    assert_int_equal(n, N_SAMPLES);
    for (size_t i = 0; i < n; i++) {
        const uint8_t *data = (const uint8_t *)s[i].sb.data;
        size_t len = s[i].sb.size;
        assert_int_equal(decode_rc(data, len, NULL), PROTO_OK);
        for (size_t cut = 0; cut < len; cut++)
            assert_int_equal(decode_rc(data, cut, NULL), PROTO_EMALFORMED);

        uint8_t *more = malloc(len * 2);
        assert_non_null(more);
        memcpy(more, data, len);
        memcpy(more + len, data, len);
        for (size_t extra = 1; extra <= len; extra++)
            assert_int_equal(decode_rc(more, len + extra, NULL), PROTO_EMALFORMED);
        more[len] = 0xc0;
        assert_int_equal(decode_rc(more, len + 1, NULL), PROTO_EMALFORMED);
        free(more);
        pk_free(&s[i]);
    }
    assert_int_equal(proto_decode(NULL, 0, NULL, &(proto_msg_t){0}), PROTO_EMALFORMED);
}

static void test_dec_not_a_map(void **state)
{
    (void)state;
    static const struct {
        uint8_t bytes[16];
        size_t len;
        int rc;
    } cases[] = {
        {{0x91, 0x81, 0xa1, 't', 0xa3, 'a', 'c', 'k'}, 8, PROTO_ETYPE}, /* [{t:ack}] */
        {{0x90}, 1, PROTO_ETYPE},
        {{0x01}, 1, PROTO_ETYPE},
        {{0xff}, 1, PROTO_ETYPE},
        {{0xc0}, 1, PROTO_ETYPE},
        {{0xc3}, 1, PROTO_ETYPE},
        {{0xa5, 'h', 'e', 'l', 'l', 'o'}, 6, PROTO_ETYPE},
        {{0xc4, 0x01, 0x81}, 3, PROTO_ETYPE},
        {{0xd4, 0x00, 0x00}, 3, PROTO_ETYPE},
        {{0xcb, 0, 0, 0, 0, 0, 0, 0, 0}, 9, PROTO_ETYPE},
        {{0x80}, 1, PROTO_EMISSING}, /* {} has no "t" */
        {{0xc1}, 1, PROTO_EMALFORMED},
        {{0x81, 0xa1, 't', 0xc1}, 4, PROTO_EMALFORMED},
        {{0x82, 0xa1, 'x', 0xc1, 0xa1, 't', 0xa3, 'a', 'c', 'k'}, 10, PROTO_EMALFORMED},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
        assert_int_equal(decode_rc(cases[i].bytes, cases[i].len, NULL), cases[i].rc);
}

static void test_dec_non_string_keys(void **state)
{
    (void)state;
    for (int kind = 0; kind < 6; kind++) {
        pk_t k;
        pk_init(&k);
        pk_map(&k, 2);
        pk_kv_str(&k, "t", "hello");
        switch (kind) {
        case 0:
            pk_uint(&k, 1);
            break;
        case 1:
            pk_bin(&k, "token", 5); /* a bin key is not a str key */
            break;
        case 2:
            pk_nil(&k);
            break;
        case 3:
            pk_array(&k, 1);
            pk_uint(&k, 1);
            break;
        case 4:
            pk_map(&k, 0);
            break;
        default:
            assert_int_equal(msgpack_pack_true(&k.p), 0);
            break;
        }
        pk_str(&k, "v");
        assert_int_equal(decode_pk(&k, NULL), PROTO_ETYPE);
        pk_free(&k);
    }
}

/* The value of one field in a valid message replaced by a wrong type. */
typedef void (*pack_fn)(pk_t *k);

static void pack_nil(pk_t *k)
{
    pk_nil(k);
}
static void pack_one(pk_t *k)
{
    pk_uint(k, 1);
}
static void pack_zero(pk_t *k)
{
    pk_uint(k, 0);
}
static void pack_neg(pk_t *k)
{
    assert_int_equal(msgpack_pack_int(&k->p, -1), 0);
}
static void pack_strv(pk_t *k)
{
    pk_str(k, "v");
}
static void pack_binv(pk_t *k)
{
    pk_bin(k, "v", 1);
}
static void pack_true(pk_t *k)
{
    assert_int_equal(msgpack_pack_true(&k->p), 0);
}
static void pack_float(pk_t *k)
{
    assert_int_equal(msgpack_pack_double(&k->p, 1.0), 0);
}
static void pack_arr(pk_t *k)
{
    pk_array(k, 1);
    pk_str(k, "v");
}
static void pack_mapv(pk_t *k)
{
    pk_map(k, 1);
    pk_kv_str(k, "a", "b");
}
static void pack_ext(pk_t *k)
{
    assert_int_equal(msgpack_pack_ext_with_body(&k->p, "v", 1, 1), 0);
}
static void pack_now(pk_t *k)
{
    pk_str(k, "now");
}
static void pack_earliest_bin(pk_t *k)
{
    pk_bin(k, "earliest", 8);
}
static void pack_hdr_int_val(pk_t *k)
{
    pk_map(k, 1);
    pk_str(k, "a");
    pk_uint(k, 1);
}
static void pack_hdr_bin_val(pk_t *k)
{
    pk_map(k, 1);
    pk_str(k, "a");
    pk_bin(k, "b", 1);
}
static void pack_hdr_nil_val(pk_t *k)
{
    pk_map(k, 1);
    pk_str(k, "a");
    pk_nil(k);
}
static void pack_hdr_int_key(pk_t *k)
{
    pk_map(k, 1);
    pk_uint(k, 1);
    pk_str(k, "b");
}
static void pack_hdr_nested(pk_t *k)
{
    pk_map(k, 1);
    pk_str(k, "a");
    pk_map(k, 0);
}
static void pack_hdr_bad_utf8_key(pk_t *k)
{
    pk_map(k, 1);
    pk_strn(k, "\xc0\xaf", 2); /* overlong '/' */
    pk_str(k, "b");
}
static void pack_hdr_bad_utf8_val(pk_t *k)
{
    pk_map(k, 1);
    pk_str(k, "a");
    pk_strn(k, "\xed\xa0\x80", 3); /* a surrogate */
}

/* Build {t:type, <fields except skip>, skip: value()}. */
static void pack_with(pk_t *k, const char *type, const char *field, pack_fn value)
{
    static const char *const pub_fields[] = {"id",      "stream", "payload", "msgid",
                                             "headers", "ack",    NULL};
    static const char *const sub_fields[] = {"id", "stream", "from", "epoch", NULL};
    static const char *const unsub_fields[] = {"id", "stream", NULL};
    static const char *const ack_fields[] = {"stream", "offset", NULL};
    static const char *const hello_fields[] = {"token", "session", "resume_token", "client", NULL};
    const char *const *fields = strcmp(type, "pub") == 0     ? pub_fields
                                : strcmp(type, "sub") == 0   ? sub_fields
                                : strcmp(type, "unsub") == 0 ? unsub_fields
                                : strcmp(type, "ack") == 0   ? ack_fields
                                                             : hello_fields;
    size_t n = 0;
    while (fields[n])
        n++;
    pk_init(k);
    pk_map(k, n + 1);
    pk_kv_str(k, "t", type);
    for (size_t i = 0; i < n; i++) {
        pk_str(k, fields[i]);
        if (strcmp(fields[i], field) == 0) {
            value(k);
        } else if (strcmp(fields[i], "id") == 0 || strcmp(fields[i], "offset") == 0 ||
                   strcmp(fields[i], "epoch") == 0) {
            pk_uint(k, 2);
        } else if (strcmp(fields[i], "payload") == 0) {
            pk_bin(k, "p", 1);
        } else if (strcmp(fields[i], "headers") == 0) {
            pk_map(k, 1);
            pk_kv_str(k, "h", "v");
        } else if (strcmp(fields[i], "from") == 0) {
            pk_str(k, "earliest");
        } else if (strcmp(fields[i], "ack") == 0) {
            pk_str(k, "replicated");
        } else {
            pk_str(k, "s");
        }
    }
}

static void test_dec_wrong_types(void **state)
{
    (void)state;
    static const struct {
        const char *type, *field;
        pack_fn value;
        int rc;
    } cases[] = {
        /* control: the fields' own types */
        {"pub", "payload", pack_strv, PROTO_OK},
        {"pub", "payload", pack_binv, PROTO_OK},
        {"sub", "from", pack_one, PROTO_OK},
        {"hello", "token", pack_strv, PROTO_OK},
        /* integers */
        {"pub", "id", pack_strv, PROTO_ETYPE},
        {"pub", "id", pack_neg, PROTO_ETYPE},
        {"pub", "id", pack_float, PROTO_ETYPE},
        {"pub", "id", pack_true, PROTO_ETYPE},
        {"pub", "id", pack_arr, PROTO_ETYPE},
        {"sub", "id", pack_binv, PROTO_ETYPE},
        {"unsub", "id", pack_mapv, PROTO_ETYPE},
        {"sub", "epoch", pack_strv, PROTO_ETYPE},
        {"sub", "epoch", pack_neg, PROTO_ETYPE},
        {"ack", "offset", pack_strv, PROTO_ETYPE},
        {"ack", "offset", pack_neg, PROTO_ETYPE},
        {"ack", "offset", pack_ext, PROTO_ETYPE},
        /* strings: stream is str only */
        {"pub", "stream", pack_binv, PROTO_ETYPE},
        {"pub", "stream", pack_one, PROTO_ETYPE},
        {"sub", "stream", pack_arr, PROTO_ETYPE},
        {"unsub", "stream", pack_true, PROTO_ETYPE},
        {"ack", "stream", pack_binv, PROTO_ETYPE},
        {"pub", "msgid", pack_one, PROTO_ETYPE},
        {"pub", "msgid", pack_binv, PROTO_ETYPE},
        {"pub", "ack", pack_strv, PROTO_ETYPE}, /* only "local" or "replicated" */
        {"pub", "ack", pack_one, PROTO_ETYPE},
        {"hello", "token", pack_binv, PROTO_ETYPE},
        {"hello", "session", pack_one, PROTO_ETYPE},
        {"hello", "resume_token", pack_arr, PROTO_ETYPE},
        {"hello", "client", pack_mapv, PROTO_ETYPE},
        /* payload */
        {"pub", "payload", pack_one, PROTO_ETYPE},
        {"pub", "payload", pack_arr, PROTO_ETYPE},
        {"pub", "payload", pack_ext, PROTO_ETYPE},
        {"pub", "payload", pack_mapv, PROTO_ETYPE},
        /* from */
        {"sub", "from", pack_zero, PROTO_ETYPE},
        {"sub", "from", pack_neg, PROTO_ETYPE},
        {"sub", "from", pack_now, PROTO_ETYPE},
        {"sub", "from", pack_earliest_bin, PROTO_ETYPE},
        {"sub", "from", pack_float, PROTO_ETYPE},
        /* headers */
        {"pub", "headers", pack_arr, PROTO_ETYPE},
        {"pub", "headers", pack_strv, PROTO_ETYPE},
        {"pub", "headers", pack_hdr_int_val, PROTO_ETYPE},
        {"pub", "headers", pack_hdr_bin_val, PROTO_ETYPE},
        {"pub", "headers", pack_hdr_nil_val, PROTO_ETYPE},
        {"pub", "headers", pack_hdr_int_key, PROTO_ETYPE},
        {"pub", "headers", pack_hdr_nested, PROTO_ETYPE},
        {"pub", "headers", pack_hdr_bad_utf8_key, PROTO_ETYPE},
        {"pub", "headers", pack_hdr_bad_utf8_val, PROTO_ETYPE},
        /* nil is absent: missing if required, fine if optional */
        {"pub", "id", pack_nil, PROTO_EMISSING},
        {"pub", "stream", pack_nil, PROTO_EMISSING},
        {"pub", "payload", pack_nil, PROTO_EMISSING},
        {"sub", "from", pack_nil, PROTO_EMISSING},
        {"ack", "offset", pack_nil, PROTO_EMISSING},
        {"sub", "epoch", pack_nil, PROTO_OK},
        {"pub", "msgid", pack_nil, PROTO_OK},
        {"pub", "headers", pack_nil, PROTO_OK},
        {"pub", "ack", pack_nil, PROTO_OK},
        {"hello", "client", pack_nil, PROTO_OK},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        pk_t k;
        pack_with(&k, cases[i].type, cases[i].field, cases[i].value);
        int rc = decode_pk(&k, NULL);
        if (rc != cases[i].rc)
            fail_msg("case %zu (%s.%s): got %d (%s), want %d", i, cases[i].type, cases[i].field, rc,
                     proto_strerror(rc), cases[i].rc);
        if (rc != PROTO_OK) {
            /* the refusal names the field and keeps the request's id */
            proto_msg_t m;
            char want[64];
            assert_int_equal(proto_decode((const uint8_t *)k.sb.data, k.sb.size, NULL, &m), rc);
            snprintf(want, sizeof(want), "field '%s' ", cases[i].field);
            if (strstr(m.error, want) == NULL)
                fail_msg("case %zu: error '%s' does not name %s", i, m.error, cases[i].field);
            assert_null(m.headers);
            bool request = strcmp(cases[i].type, "ack") != 0 && strcmp(cases[i].type, "hello") != 0;
            if (request && strcmp(cases[i].field, "id") != 0) {
                assert_int_not_equal(m.type, 0);
                assert_true(m.id == 2);
            } else if (request) {
                assert_int_equal(m.type, 0); /* no id: cannot be answered as a request */
            }
        }
        pk_free(&k);
    }
}

/* refresh (issue #18): id and token required; refreshok and welcome carry
 * the token's expiry. */
static void test_refresh(void **state)
{
    (void)state;
    dec_t d;
    pk_t k;

    pk_init(&k);
    pk_map(&k, 3);
    pk_kv_str(&k, "t", "refresh");
    pk_kv_uint(&k, "id", 12);
    pk_kv_str(&k, "token", "a.b.c");
    assert_int_equal(dec_run(&d, k.sb.data, k.sb.size, NULL), 0);
    assert_int_equal(d.m.type, PROTO_REFRESH);
    assert_int_equal(d.m.id, 12);
    assert_bytes_str(d.m.token, "a.b.c");
    dec_done(&d);
    pk_free(&k);

    /* without a token, or without an id: missing */
    pk_init(&k);
    pk_map(&k, 2);
    pk_kv_str(&k, "t", "refresh");
    pk_kv_uint(&k, "id", 12);
    assert_int_equal(decode_pk(&k, NULL), PROTO_EMISSING);
    pk_free(&k);
    pk_init(&k);
    pk_map(&k, 2);
    pk_kv_str(&k, "t", "refresh");
    pk_kv_str(&k, "token", "a.b.c");
    assert_int_equal(decode_pk(&k, NULL), PROTO_EMISSING);
    pk_free(&k);

    proto_buf_t b = {0};
    unp_t r;
    assert_int_equal(proto_enc_refreshok(&b, 12, 1900000000), 0);
    unp_one(&r, b.data, b.len);
    assert_entries(&r, 3);
    assert_type(&r, "refreshok");
    assert_uint_field(&r, "id", 12);
    assert_uint_field(&r, "token_expires", 1900000000);
    unp_done(&r);

    proto_welcome_t w = {.session = "s",
                         .resume_token = "r",
                         .server = "arqd",
                         .max_payload = 1,
                         .max_inflight = 1,
                         .session_ttl_s = 1,
                         .token_expires = 1900000001};
    proto_buf_reset(&b);
    assert_int_equal(proto_enc_welcome(&b, &w), 0);
    unp_one(&r, b.data, b.len);
    assert_entries(&r, 9);
    assert_uint_field(&r, "token_expires", 1900000001);
    unp_done(&r);
    w.token_expires = 0;
    proto_buf_reset(&b);
    assert_int_equal(proto_enc_welcome(&b, &w), 0);
    unp_one(&r, b.data, b.len);
    assert_entries(&r, 8);
    assert_null(get(&r, "token_expires"));
    unp_done(&r);
    proto_buf_free(&b);
}

static void test_dec_missing_and_unknown_type(void **state)
{
    (void)state;
    static const struct {
        const char *type, *field;
    } required[] = {
        {"sub", "id"},       {"sub", "stream"}, {"sub", "from"},   {"unsub", "id"},
        {"unsub", "stream"}, {"pub", "id"},     {"pub", "stream"}, {"pub", "payload"},
        {"ack", "stream"},   {"ack", "offset"},
    };
    for (size_t i = 0; i < sizeof(required) / sizeof(required[0]); i++) {
        /* rename the field so it becomes an unknown key */
        pk_t k;
        pack_with(&k, required[i].type, "", NULL);
        dec_t d;
        assert_int_equal(dec_run(&d, k.sb.data, k.sb.size, NULL), PROTO_OK);
        dec_done(&d);
        char *p = memmem(k.sb.data, k.sb.size, required[i].field, strlen(required[i].field));
        assert_non_null(p);
        p[0] = 'Z';
        assert_int_equal(decode_pk(&k, NULL), PROTO_EMISSING);
        pk_free(&k);
    }

    pk_t k;
    /* no "t" at all */
    pk_init(&k);
    pk_map(&k, 2);
    pk_kv_uint(&k, "id", 1);
    pk_kv_str(&k, "stream", "s");
    assert_int_equal(decode_pk(&k, NULL), PROTO_EMISSING);
    pk_free(&k);

    static const char *const unknown[] = {"",        "Hello", "hello ", "publish", "msg",
                                          "welcome", "pu",    "pubx",   "subok"};
    for (size_t i = 0; i < sizeof(unknown) / sizeof(unknown[0]); i++) {
        pk_init(&k);
        pk_map(&k, 1);
        pk_kv_str(&k, "t", unknown[i]);
        assert_int_equal(decode_pk(&k, NULL), PROTO_EUNKNOWN);
        pk_free(&k);
    }
    /* "t" of the wrong type */
    static const pack_fn wrong[] = {pack_one, pack_binv, pack_arr, pack_mapv, pack_true};
    for (size_t i = 0; i < sizeof(wrong) / sizeof(wrong[0]); i++) {
        pk_init(&k);
        pk_map(&k, 1);
        pk_str(&k, "t");
        wrong[i](&k);
        assert_int_equal(decode_pk(&k, NULL), PROTO_ETYPE);
        pk_free(&k);
    }
    pk_init(&k);
    pk_map(&k, 1);
    pk_str(&k, "t");
    pk_nil(&k);
    assert_int_equal(decode_pk(&k, NULL), PROTO_EMISSING);
    pk_free(&k);
}

static void test_dec_duplicate_keys(void **state)
{
    (void)state;
    static const char *const dups[] = {"t", "id", "stream", "payload", "msgid", "headers"};
    for (size_t i = 0; i < sizeof(dups) / sizeof(dups[0]); i++) {
        pk_t k;
        pack_with(&k, "pub", "", NULL);
        /* append a second copy of one known key (bump the fixmap count) */
        ((uint8_t *)k.sb.data)[0]++;
        pk_str(&k, dups[i]);
        if (strcmp(dups[i], "t") == 0 || strcmp(dups[i], "stream") == 0 ||
            strcmp(dups[i], "msgid") == 0)
            pk_str(&k, "pub");
        else if (strcmp(dups[i], "headers") == 0)
            pk_map(&k, 0);
        else if (strcmp(dups[i], "payload") == 0)
            pk_bin(&k, "q", 1);
        else
            pk_uint(&k, 3);
        assert_int_equal(decode_pk(&k, NULL), PROTO_EMALFORMED);
        pk_free(&k);
    }
    /* a known key repeated even with a nil value */
    pk_t k;
    pack_with(&k, "sub", "", NULL);
    ((uint8_t *)k.sb.data)[0]++;
    pk_str(&k, "epoch");
    pk_nil(&k);
    assert_int_equal(decode_pk(&k, NULL), PROTO_EMALFORMED);
    pk_free(&k);
    /* unknown keys may repeat */
    pack_with(&k, "ack", "", NULL);
    ((uint8_t *)k.sb.data)[0] += 2;
    pk_kv_str(&k, "x", "1");
    pk_kv_str(&k, "x", "2");
    assert_int_equal(decode_pk(&k, NULL), PROTO_OK);
    pk_free(&k);
    /* duplicate header keys */
    pk_init(&k);
    pk_map(&k, 5);
    pk_kv_str(&k, "t", "pub");
    pk_kv_uint(&k, "id", 1);
    pk_kv_str(&k, "stream", "s");
    pk_kv_str(&k, "payload", "p");
    pk_str(&k, "headers");
    pk_map(&k, 3);
    pk_kv_str(&k, "a", "1");
    pk_kv_str(&k, "b", "2");
    pk_kv_str(&k, "a", "3");
    assert_int_equal(decode_pk(&k, NULL), PROTO_EMALFORMED);
    pk_free(&k);
}

static void pack_pub_payload(pk_t *k, size_t n, int as_str)
{
    uint8_t *p = malloc(n ? n : 1);
    assert_non_null(p);
    memset(p, 'x', n);
    pk_init(k);
    pk_map(k, 4);
    pk_kv_str(k, "t", "pub");
    pk_kv_uint(k, "id", 1);
    pk_kv_str(k, "stream", "s");
    pk_str(k, "payload");
    if (as_str)
        pk_strn(k, p, n);
    else
        pk_bin(k, p, n);
    free(p);
}

static void test_dec_payload_limit(void **state)
{
    (void)state;
    static const struct {
        size_t n;
        uint32_t max;
        int rc;
    } cases[] = {
        {1024 * 1024, 0, PROTO_OK},
        {1024 * 1024 + 1, 0, PROTO_ELIMIT},
        {4 * 1024 * 1024, 0, PROTO_ELIMIT},
        {10, 10, PROTO_OK},
        {11, 10, PROTO_ELIMIT},
        {0, 1, PROTO_OK},
        {2 * 1024 * 1024, 2 * 1024 * 1024, PROTO_OK},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        for (int as_str = 0; as_str < 2; as_str++) {
            pk_t k;
            pack_pub_payload(&k, cases[i].n, as_str);
            proto_limits_t lim = {.max_payload = cases[i].max};
            assert_int_equal(decode_pk(&k, &lim), cases[i].rc);
            if (cases[i].max == 0)
                assert_int_equal(decode_pk(&k, NULL), cases[i].rc);
            pk_free(&k);
        }
    }
}

static void pack_pub_headers(pk_t *k, size_t n, size_t value_len)
{
    char *v = malloc(value_len + 1);
    assert_non_null(v);
    memset(v, 'v', value_len);
    v[value_len] = '\0';
    pk_init(k);
    pk_map(k, 5);
    pk_kv_str(k, "t", "pub");
    pk_kv_uint(k, "id", 1);
    pk_kv_str(k, "stream", "s");
    pk_kv_str(k, "payload", "p");
    pk_str(k, "headers");
    pk_map(k, n);
    for (size_t i = 0; i < n; i++) {
        char key[32];
        snprintf(key, sizeof(key), "k%04zu", i); /* 5 bytes */
        pk_kv_str(k, key, v);
    }
    free(v);
}

static void test_dec_header_limits(void **state)
{
    (void)state;
    static const struct {
        size_t n, value_len;
        proto_limits_t lim;
        int rc;
    } cases[] = {
        {32, 1, {0}, PROTO_OK},
        {33, 1, {0}, PROTO_ELIMIT},
        {1000, 0, {0}, PROTO_ELIMIT},
        {1, 8192 - 5, {0}, PROTO_OK},
        {1, 8192 - 4, {0}, PROTO_ELIMIT},
        {2, 4096 - 5, {0}, PROTO_OK},
        {2, 4096 - 4, {0}, PROTO_ELIMIT},
        {1, 70000, {0}, PROTO_ELIMIT},
        {3, 0, {.max_headers = 3}, PROTO_OK},
        {4, 0, {.max_headers = 3}, PROTO_ELIMIT},
        {2, 5, {.max_header_bytes = 20}, PROTO_OK},
        {2, 6, {.max_header_bytes = 20}, PROTO_ELIMIT},
        {100, 5, {.max_headers = 100, .max_header_bytes = 1000}, PROTO_OK},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        pk_t k;
        dec_t d;
        pack_pub_headers(&k, cases[i].n, cases[i].value_len);
        if (dec_run(&d, k.sb.data, k.sb.size, &cases[i].lim) != cases[i].rc)
            fail_msg("case %zu: got %d, want %d", i, d.rc, cases[i].rc);
        if (d.rc == PROTO_OK) {
            assert_int_equal(d.m.n_headers, cases[i].n);
            assert_int_equal(d.m.headers[cases[i].n - 1].value.len, cases[i].value_len);
        }
        dec_done(&d);
        pk_free(&k);
    }
}

/* A tiny deterministic PRNG, so a failure reproduces. */
static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint64_t rng(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

/* Random byte edits of valid messages: any result but a crash is fine, and
 * a decoded message only ever points inside its input (checked by dec_run). */
static void test_dec_mutations(void **state)
{
    (void)state;
    static const uint8_t interesting[] = {0x00, 0x7f, 0x80, 0x8f, 0x90, 0x9f, 0xa0,
                                          0xbf, 0xc0, 0xc1, 0xc4, 0xc6, 0xc9, 0xcf,
                                          0xd3, 0xd8, 0xdb, 0xdd, 0xdf, 0xff};
    pk_t s[N_SAMPLES];
    size_t n = build_samples(s);
    uint8_t buf[512];
    size_t ok = 0, total = 0;
    for (size_t i = 0; i < n; i++) {
        for (int iter = 0; iter < 4000; iter++) {
            size_t len = s[i].sb.size;
            assert_true(len + 8 <= sizeof(buf));
            memcpy(buf, s[i].sb.data, len);
            int edits = 1 + (int)(rng() % 3);
            for (int e = 0; e < edits && len > 0; e++) {
                size_t at = (size_t)(rng() % len);
                switch (rng() % 5) {
                case 0:
                    buf[at] ^= (uint8_t)(1u << (rng() % 8));
                    break;
                case 1:
                    buf[at] = interesting[rng() % sizeof(interesting)];
                    break;
                case 2:
                    buf[at] = (uint8_t)rng();
                    break;
                case 3: /* delete a byte */
                    memmove(buf + at, buf + at + 1, len - at - 1);
                    len--;
                    break;
                default: /* insert a byte */
                    memmove(buf + at + 1, buf + at, len - at);
                    buf[at] = interesting[rng() % sizeof(interesting)];
                    len++;
                    break;
                }
            }
            dec_t d;
            int rc = dec_run(&d, buf, len, NULL);
            assert_true(rc <= 0 && rc >= PROTO_ELIMIT); /* never ENOMEM or a stray code */
            ok += rc == PROTO_OK;
            total++;
            dec_done(&d);
        }
        pk_free(&s[i]);
    }
    /* the edits do reach the field logic, not only the scanner */
    assert_true(ok > 0 && ok < total);
}

/* The header array is the decoder's only allocation. */
static void test_dec_enomem(void **state)
{
    (void)state;
    pk_t k;
    dec_t d;
    pack_pub_headers(&k, 3, 4);
    alloc_budget = 0;
    int rc = dec_run(&d, k.sb.data, k.sb.size, NULL); /* checks *out is untouched */
    alloc_budget = -1;
    assert_int_equal(rc, PROTO_ENOMEM);
    dec_done(&d);
    pk_free(&k);
    /* messages without headers allocate nothing */
    pack_with(&k, "sub", "", NULL);
    alloc_budget = 0;
    rc = dec_run(&d, k.sb.data, k.sb.size, NULL);
    alloc_budget = -1;
    assert_int_equal(rc, PROTO_OK);
    dec_done(&d);
    pk_free(&k);
}

static void test_strerror(void **state)
{
    (void)state;
    static const int codes[] = {PROTO_OK,       PROTO_EMALFORMED, PROTO_ETYPE, PROTO_EMISSING,
                                PROTO_EUNKNOWN, PROTO_ELIMIT,     PROTO_ENOMEM};
    for (size_t i = 0; i < sizeof(codes) / sizeof(codes[0]); i++) {
        assert_non_null(proto_strerror(codes[i]));
        assert_string_not_equal(proto_strerror(codes[i]), proto_strerror(-1000));
        for (size_t j = 0; j < i; j++)
            assert_string_not_equal(proto_strerror(codes[i]), proto_strerror(codes[j]));
    }
    assert_non_null(proto_strerror(12345));
    proto_msg_free(NULL);
    proto_buf_free(NULL);
    proto_msg_t m = {0};
    proto_msg_free(&m);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_enc_welcome),
        cmocka_unit_test(test_enc_subok_unsubok),
        cmocka_unit_test(test_enc_puback),
        cmocka_unit_test(test_enc_nack_error),
        cmocka_unit_test(test_enc_msg),
        cmocka_unit_test(test_enc_msg_bad_headers),
        cmocka_unit_test(test_enc_gap_and_append),
        cmocka_unit_test(test_enc_enomem),
        cmocka_unit_test(test_dec_hello),
        cmocka_unit_test(test_dec_sub),
        cmocka_unit_test(test_dec_unsub_ack),
        cmocka_unit_test(test_dec_pub),
        cmocka_unit_test(test_dec_pub_ack),
        cmocka_unit_test(test_dec_int_formats),
        cmocka_unit_test(test_dec_huge_declared),
        cmocka_unit_test(test_dec_deep_nesting),
        cmocka_unit_test(test_dec_truncation_trailing),
        cmocka_unit_test(test_dec_not_a_map),
        cmocka_unit_test(test_dec_non_string_keys),
        cmocka_unit_test(test_dec_wrong_types),
        cmocka_unit_test(test_dec_missing_and_unknown_type),
        cmocka_unit_test(test_refresh),
        cmocka_unit_test(test_dec_duplicate_keys),
        cmocka_unit_test(test_dec_payload_limit),
        cmocka_unit_test(test_dec_header_limits),
        cmocka_unit_test(test_dec_mutations),
        cmocka_unit_test(test_dec_enomem),
        cmocka_unit_test(test_strerror),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

/*
 * auth_test.c - api/auth.c: HS256 tokens (issue, verify, every way a token
 * can be wrong) and stream-pattern matching.
 *
 * Tokens with claims auth_issue() cannot make (nbf, wrong types, other
 * algorithms) are built with libjwt directly (make_token) or by hand
 * (b64url) for algorithms libjwt will not sign with.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jwt.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "auth.h"
#include "proto.h"

#define NOW INT64_C(1700000000)

static const uint8_t key[] = "test-key-0123456789abcdef-0123456";
#define KEY_LEN (sizeof(key) - 1)

/* A token signed with alg and k over the claims in JSON (libjwt). */
static char *make_token_alg(jwt_alg_t alg, const uint8_t *k, size_t k_len, const char *claims)
{
    jwt_t *jwt = NULL;
    char *tok;

    assert_int_equal(jwt_new(&jwt), 0);
    assert_int_equal(jwt_add_grants_json(jwt, claims), 0);
    assert_int_equal(jwt_set_alg(jwt, alg, k, (int)k_len), 0);
    tok = jwt_encode_str(jwt);
    assert_non_null(tok);
    jwt_free(jwt);
    return tok;
}

static char *make_token(const char *claims)
{
    return make_token_alg(JWT_ALG_HS256, key, KEY_LEN, claims);
}

static int verify_str(const char *tok, auth_token_t *out)
{
    return auth_verify(tok, strlen(tok), key, KEY_LEN, NOW, out);
}

/* Verify, expecting want; free the result on success. */
static void expect(const char *tok, int want)
{
    auth_token_t t;
    int rc = verify_str(tok, &t);

    if (rc != want)
        fail_msg("token %s: got %d (%s), want %d (%s)", tok, rc, auth_strerror(rc), want,
                 auth_strerror(want));
    if (rc == AUTH_OK)
        auth_token_free(&t);
}

static void expect_claims(const char *claims, int want)
{
    char *tok = make_token(claims);

    expect(tok, want);
    free(tok);
}

/* base64url without padding of p[0..n), appended to out. */
static void b64url_cat_n(char *out, const void *data, size_t n)
{
    static const char tab[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    size_t o = strlen(out);
    const unsigned char *p = data;

    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)p[i] << 16;
        if (i + 1 < n)
            v |= (uint32_t)p[i + 1] << 8;
        if (i + 2 < n)
            v |= p[i + 2];
        out[o++] = tab[(v >> 18) & 63];
        out[o++] = tab[(v >> 12) & 63];
        if (i + 1 < n)
            out[o++] = tab[(v >> 6) & 63];
        if (i + 2 < n)
            out[o++] = tab[v & 63];
    }
    out[o] = '\0';
}

static void b64url_cat(char *out, const char *s)
{
    b64url_cat_n(out, s, strlen(s));
}

/* "<b64 header>.<b64 payload>.<sig>" */
static void hand_token(char *out, const char *header, const char *payload, const char *sig)
{
    out[0] = '\0';
    b64url_cat(out, header);
    strcat(out, ".");
    b64url_cat(out, payload);
    strcat(out, ".");
    strcat(out, sig);
}

/* Like hand_token, with a real HS256 signature made with key. */
static void signed_token(char *out, const char *header, const char *payload)
{
    unsigned char mac[EVP_MAX_MD_SIZE];
    unsigned int mac_len = 0;

    hand_token(out, header, payload, "");
    out[strlen(out) - 1] = '\0';
    assert_non_null(HMAC(EVP_sha256(), key, (int)KEY_LEN, (const unsigned char *)out, strlen(out),
                         mac, &mac_len));
    strcat(out, ".");
    b64url_cat_n(out, mac, mac_len);
}

static void test_round_trip(void **state)
{
    const char *pub[] = {"chat.*", "events"};
    const char *subs[] = {"*"};
    auth_token_t t;
    char *tok = NULL;

    (void)state;
    assert_int_equal(auth_issue(key, KEY_LEN, "alice", NOW + 60, pub, 2, subs, 1, &tok), AUTH_OK);
    assert_non_null(tok);
    memset(&t, 0xa5, sizeof(t));
    assert_int_equal(verify_str(tok, &t), AUTH_OK);
    assert_string_equal(t.subject, "alice");
    assert_true(t.expires == NOW + 60);
    assert_int_equal(t.n_pub, 2);
    assert_string_equal(t.pub[0], "chat.*");
    assert_string_equal(t.pub[1], "events");
    assert_int_equal(t.n_subs, 1);
    assert_string_equal(t.subs[0], "*");
    auth_token_free(&t);
    auth_token_free(&t); /* idempotent */
    assert_null(t.subject);
    free(tok);

    /* No patterns: empty lists, no rights. */
    assert_int_equal(auth_issue(key, KEY_LEN, "bob", NOW + 1, NULL, 0, NULL, 0, &tok), AUTH_OK);
    assert_int_equal(verify_str(tok, &t), AUTH_OK);
    assert_string_equal(t.subject, "bob");
    assert_int_equal(t.n_pub, 0);
    assert_null(t.pub);
    assert_int_equal(t.n_subs, 0);
    assert_null(t.subs);
    auth_token_free(&t);
    free(tok);

    /* A binary key (NUL bytes inside) works: lengths, not strings. */
    static const uint8_t bin[] = {0, 1, 2, 0, 255, 254, 0, 7};
    assert_int_equal(auth_issue(bin, sizeof(bin), "carol", NOW + 5, NULL, 0, NULL, 0, &tok),
                     AUTH_OK);
    assert_int_equal(auth_verify(tok, strlen(tok), bin, sizeof(bin), NOW, &t), AUTH_OK);
    auth_token_free(&t);
    assert_int_equal(auth_verify(tok, strlen(tok), bin, 3, NOW, &t), AUTH_ESIGNATURE);
    free(tok);

    /* The token need not be NUL-terminated: only token_len bytes count. */
    assert_int_equal(auth_issue(key, KEY_LEN, "dave", NOW + 5, NULL, 0, NULL, 0, &tok), AUTH_OK);
    {
        size_t n = strlen(tok);
        char *copy = malloc(n);
        assert_non_null(copy);
        memcpy(copy, tok, n);
        assert_int_equal(auth_verify(copy, n, key, KEY_LEN, NOW, &t), AUTH_OK);
        auth_token_free(&t);
        free(copy);
    }
    free(tok);
}

static void test_expiry(void **state)
{
    char *tok;

    (void)state;
    expect_claims("{\"sub\":\"a\",\"exp\":1700000001}", AUTH_OK);
    expect_claims("{\"sub\":\"a\",\"exp\":1700000000}", AUTH_EEXPIRED); /* exp == now */
    expect_claims("{\"sub\":\"a\",\"exp\":1699999999}", AUTH_EEXPIRED);
    expect_claims("{\"sub\":\"a\",\"exp\":-5}", AUTH_EEXPIRED);
    expect_claims("{\"sub\":\"a\",\"exp\":0}", AUTH_EEXPIRED);
    assert_int_equal(auth_issue(key, KEY_LEN, "a", NOW - 1, NULL, 0, NULL, 0, &tok), AUTH_OK);
    expect(tok, AUTH_EEXPIRED);
    free(tok);
}

static void test_nbf(void **state)
{
    (void)state;
    expect_claims("{\"sub\":\"a\",\"exp\":1800000000,\"nbf\":1700000001}", AUTH_EEXPIRED);
    expect_claims("{\"sub\":\"a\",\"exp\":1800000000,\"nbf\":1700000000}", AUTH_OK);
    expect_claims("{\"sub\":\"a\",\"exp\":1800000000,\"nbf\":1}", AUTH_OK);
    expect_claims("{\"sub\":\"a\",\"exp\":1800000000,\"nbf\":\"1\"}", AUTH_ECLAIMS);
    expect_claims("{\"sub\":\"a\",\"exp\":1800000000,\"nbf\":1.5}", AUTH_ECLAIMS);
    expect_claims("{\"sub\":\"a\",\"exp\":1800000000,\"nbf\":null}", AUTH_ECLAIMS);
}

static void test_wrong_key(void **state)
{
    static const uint8_t other[] = "another-key-0123456789abcdef-0123";
    auth_token_t t;
    char *tok;

    (void)state;
    tok = make_token_alg(JWT_ALG_HS256, other, sizeof(other) - 1,
                         "{\"sub\":\"a\",\"exp\":1800000000}");
    expect(tok, AUTH_ESIGNATURE);
    free(tok);

    tok = make_token("{\"sub\":\"a\",\"exp\":1800000000}");
    /* Key a prefix of the right one. */
    assert_int_equal(auth_verify(tok, strlen(tok), key, KEY_LEN - 1, NOW, &t), AUTH_ESIGNATURE);
    /* Empty or missing key: nothing verifies. */
    assert_int_equal(auth_verify(tok, strlen(tok), key, 0, NOW, &t), AUTH_ESIGNATURE);
    assert_int_equal(auth_verify(tok, strlen(tok), NULL, 0, NOW, &t), AUTH_ESIGNATURE);
    assert_int_equal(auth_verify(tok, strlen(tok), (const uint8_t *)"", 0, NOW, &t),
                     AUTH_ESIGNATURE);
    free(tok);
}

static void test_tampered_payload(void **state)
{
    char forged[1024];
    char *tok = make_token("{\"sub\":\"alice\",\"exp\":1800000000,\"pub\":[\"a\"]}");
    char *sig = strrchr(tok, '.');

    (void)state;
    /* The original header and signature over a payload with more rights. */
    hand_token(forged, "{\"alg\":\"HS256\",\"typ\":\"JWT\"}",
               "{\"sub\":\"alice\",\"exp\":1800000000,\"pub\":[\"*\"]}", sig + 1);
    expect(forged, AUTH_ESIGNATURE);
    /* Signature removed or emptied. */
    *sig = '\0';
    expect(tok, AUTH_EMALFORMED);
    strcat(tok, ".");
    expect(tok, AUTH_ESIGNATURE);
    free(tok);
}

static void test_alg_none(void **state)
{
    static const char *const headers[] = {
        "{\"alg\":\"none\"}", "{\"alg\":\"none\",\"typ\":\"JWT\"}",
        "{\"alg\":\"None\"}", "{\"alg\":\"NONE\"}",
        "{\"alg\":\"\"}",     "{\"typ\":\"JWT\"}",
        "{\"alg\":null}",     "{\"alg\":256}",
    };
    char tok[1024];
    char *good = make_token("{\"sub\":\"mallory\",\"exp\":4000000000}");
    const char *good_sig = strrchr(good, '.') + 1;

    (void)state;
    /* The literal token from the brief: {"alg":"none"}, empty signature. */
    strcpy(tok, "eyJhbGciOiJub25lIn0.");
    b64url_cat(tok, "{\"sub\":\"mallory\",\"exp\":4000000000,\"pub\":[\"*\"]}");
    strcat(tok, ".");
    expect(tok, AUTH_EMALFORMED);
    for (size_t i = 0; i < sizeof(headers) / sizeof(headers[0]); i++) {
        hand_token(tok, headers[i], "{\"sub\":\"mallory\",\"exp\":4000000000}", "");
        expect(tok, AUTH_EMALFORMED);
        /* Not with a valid HS256 signature attached either. */
        hand_token(tok, headers[i], "{\"sub\":\"mallory\",\"exp\":4000000000}", good_sig);
        expect(tok, AUTH_EMALFORMED);
    }
    free(good);
}

static void test_other_algs(void **state)
{
    char tok[1024];
    char *t;

    (void)state;
    /* HS384/HS512 with the right key are still not HS256. */
    t = make_token_alg(JWT_ALG_HS512, key, KEY_LEN, "{\"sub\":\"a\",\"exp\":1800000000}");
    expect(t, AUTH_EMALFORMED);
    free(t);
    t = make_token_alg(JWT_ALG_HS384, key, KEY_LEN, "{\"sub\":\"a\",\"exp\":1800000000}");
    expect(t, AUTH_EMALFORMED);
    free(t);
    /* RS256 / ES256 headers (the key-confusion attack: an HMAC made with
     * the "public key" as secret). */
    hand_token(tok, "{\"alg\":\"RS256\",\"typ\":\"JWT\"}", "{\"sub\":\"a\",\"exp\":1800000000}",
               "c2lnbmF0dXJl");
    expect(tok, AUTH_EMALFORMED);
    hand_token(tok, "{\"alg\":\"ES256\"}", "{\"sub\":\"a\",\"exp\":1800000000}", "c2ln");
    expect(tok, AUTH_EMALFORMED);
    hand_token(tok, "{\"alg\":\"HS256 \"}", "{\"sub\":\"a\",\"exp\":1800000000}", "c2ln");
    expect(tok, AUTH_EMALFORMED);
    /* Correctly signed with the right key, yet not acceptable: */
    signed_token(tok, "{\"alg\":\"HS256\",\"kid\":\"k1\"}", "{\"sub\":\"a\",\"exp\":1800000000}");
    expect(tok, AUTH_OK); /* (the signer works) */
    /* "alg" not exactly HS256, */
    signed_token(tok, "{\"alg\":\"HS256 \"}", "{\"sub\":\"a\",\"exp\":1800000000}");
    expect(tok, AUTH_EMALFORMED);
    signed_token(tok, "{\"alg\":\"hs256\"}", "{\"sub\":\"a\",\"exp\":1800000000}");
    expect(tok, AUTH_EMALFORMED);
    /* critical header extensions (not understood), */
    signed_token(tok, "{\"alg\":\"HS256\",\"crit\":[\"b64\"],\"b64\":false}",
                 "{\"sub\":\"a\",\"exp\":1800000000}");
    expect(tok, AUTH_EMALFORMED);
    /* a header typ other than JWT, */
    signed_token(tok, "{\"alg\":\"HS256\",\"typ\":\"xyz\"}", "{\"sub\":\"a\",\"exp\":1800000000}");
    expect(tok, AUTH_EMALFORMED);
    /* a claims set that is not an object, */
    signed_token(tok, "{\"alg\":\"HS256\"}", "[1,2]");
    expect(tok, AUTH_EMALFORMED);
    signed_token(tok, "{\"alg\":\"HS256\"}", "\"str\"");
    expect(tok, AUTH_EMALFORMED);
    /* a NUL inside a claim, a header or claims that are not JSON. */
    signed_token(tok, "{\"alg\":\"HS256\"}", "{\"sub\":\"a\\u0000b\",\"exp\":1800000000}");
    expect(tok, AUTH_EMALFORMED);
    signed_token(tok, "{\"alg\":\"HS256\"", "{\"sub\":\"a\",\"exp\":1800000000}");
    expect(tok, AUTH_EMALFORMED);
    signed_token(tok, "{\"alg\":\"HS256\"}", "{\"sub\":\"a\",\"exp\":1800000000");
    expect(tok, AUTH_EMALFORMED);
}

static void test_claims_required(void **state)
{
    char sub[300];

    (void)state;
    expect_claims("{\"exp\":1800000000}", AUTH_ECLAIMS);
    expect_claims("{\"sub\":\"\",\"exp\":1800000000}", AUTH_ECLAIMS);
    expect_claims("{\"sub\":42,\"exp\":1800000000}", AUTH_ECLAIMS);
    expect_claims("{\"sub\":null,\"exp\":1800000000}", AUTH_ECLAIMS);
    expect_claims("{\"sub\":[\"a\"],\"exp\":1800000000}", AUTH_ECLAIMS);
    expect_claims("{\"sub\":\"a\"}", AUTH_ECLAIMS);
    expect_claims("{\"sub\":\"a\",\"exp\":\"1800000000\"}", AUTH_ECLAIMS);
    expect_claims("{\"sub\":\"a\",\"exp\":1800000000.0}", AUTH_ECLAIMS);
    expect_claims("{\"sub\":\"a\",\"exp\":true}", AUTH_ECLAIMS);
    expect_claims("{\"sub\":\"a\",\"exp\":null}", AUTH_ECLAIMS);
    /* sub up to 255 bytes (it becomes the WAL producer id). */
    (void)snprintf(sub, sizeof(sub), "{\"sub\":\"%0255d\",\"exp\":1800000000}", 0);
    expect_claims(sub, AUTH_OK);
    (void)snprintf(sub, sizeof(sub), "{\"sub\":\"%0256d\",\"exp\":1800000000}", 0);
    expect_claims(sub, AUTH_ECLAIMS);
}

static void test_pattern_claims(void **state)
{
    char claims[16384];
    auth_token_t t;
    char *tok;
    size_t n;

    (void)state;
    tok = make_token("{\"sub\":\"a\",\"exp\":1800000000,\"pub\":[\"x.*\",\"y\"],"
                     "\"subscribe\":[\"z.*\"],\"other\":{\"ignored\":true}}");
    assert_int_equal(verify_str(tok, &t), AUTH_OK);
    assert_int_equal(t.n_pub, 2);
    assert_string_equal(t.pub[0], "x.*");
    assert_string_equal(t.pub[1], "y");
    assert_int_equal(t.n_subs, 1);
    assert_string_equal(t.subs[0], "z.*");
    auth_token_free(&t);
    free(tok);

    expect_claims("{\"sub\":\"a\",\"exp\":1800000000,\"pub\":[]}", AUTH_OK);
    expect_claims("{\"sub\":\"a\",\"exp\":1800000000,\"pub\":\"x\"}", AUTH_ECLAIMS);
    expect_claims("{\"sub\":\"a\",\"exp\":1800000000,\"pub\":null}", AUTH_ECLAIMS);
    expect_claims("{\"sub\":\"a\",\"exp\":1800000000,\"pub\":{\"0\":\"x\"}}", AUTH_ECLAIMS);
    expect_claims("{\"sub\":\"a\",\"exp\":1800000000,\"pub\":[\"x\",1]}", AUTH_ECLAIMS);
    expect_claims("{\"sub\":\"a\",\"exp\":1800000000,\"pub\":[\"x\",null]}", AUTH_ECLAIMS);
    expect_claims("{\"sub\":\"a\",\"exp\":1800000000,\"pub\":[[\"x\"]]}", AUTH_ECLAIMS);
    expect_claims("{\"sub\":\"a\",\"exp\":1800000000,\"pub\":[\"\"]}", AUTH_ECLAIMS);
    expect_claims("{\"sub\":\"a\",\"exp\":1800000000,\"subscribe\":[true]}", AUTH_ECLAIMS);
    expect_claims("{\"sub\":\"a\",\"exp\":1800000000,\"subscribe\":7}", AUTH_ECLAIMS);

    /* 64 patterns is the limit, 65 too many; for each list. */
    for (int which = 0; which < 2; which++) {
        for (int count = 64; count <= 65; count++) {
            n = (size_t)snprintf(claims, sizeof(claims),
                                 "{\"sub\":\"a\",\"exp\":1800000000,\"%s\":[",
                                 which ? "subscribe" : "pub");
            for (int i = 0; i < count; i++)
                n +=
                    (size_t)snprintf(claims + n, sizeof(claims) - n, "%s\"s.%d\"", i ? "," : "", i);
            (void)snprintf(claims + n, sizeof(claims) - n, "]}");
            expect_claims(claims, count == 64 ? AUTH_OK : AUTH_ECLAIMS);
        }
    }
    /* 200 bytes per pattern is the limit. */
    for (int len = 200; len <= 201; len++) {
        (void)snprintf(claims, sizeof(claims),
                       "{\"sub\":\"a\",\"exp\":1800000000,\"subscribe\":[\"%0*d\"]}", len, 0);
        expect_claims(claims, len == 200 ? AUTH_OK : AUTH_ECLAIMS);
    }
}

static void test_match(void **state)
{
    static const struct {
        const char *pattern;
        const char *name;
        int want;
    } table[] = {
        {"*", "anything", 1},
        {"*", "a.b.c", 1},
        {"*", "", 1},
        {"a.b.*", "a.b.x", 1},
        {"a.b.*", "a.b.x.y", 1},
        {"a.b.*", "a.b.", 0},
        {"a.b.*", "a.b", 0},
        {"a.b.*", "a.bx", 0},
        {"a.b.*", "a.bx.y", 0},
        {"a.b.*", "xa.b.c", 0},
        {"a.b.*", "A.b.c", 0},
        {"a.*", "a.b", 1},
        {"chat", "chat", 1},
        {"chat", "chat2", 0},
        {"chat", "cha", 0},
        {"chat", "Chat", 0},
        {"chat", "chat.x", 0},
        {"a*", "a*", 1}, /* a '*' not after a dot is literal */
        {"a*", "ab", 0},
        {"a.*.c", "a.b.c", 0},
        {"a.*.c", "a.*.c", 1},
        {"*.x", "a.x", 0},
        {"", "", 1},
        {"", "a", 0},
    };
    char *one[1];
    char *none[] = {"x", "y.*"};
    char *many[] = {"x", "y.*", "z"};

    (void)state;
    for (size_t i = 0; i < sizeof(table) / sizeof(table[0]); i++) {
        one[0] = (char *)table[i].pattern;
        int got = proto_pattern_match(one, 1, table[i].name, strlen(table[i].name));
        if (got != table[i].want)
            fail_msg("proto_pattern_match('%s', '%s') = %d, want %d", table[i].pattern, table[i].name, got,
                     table[i].want);
    }
    assert_int_equal(proto_pattern_match(NULL, 0, "x", 1), 0);
    assert_int_equal(proto_pattern_match(none, 2, "z", 1), 0);
    assert_int_equal(proto_pattern_match(many, 3, "z", 1), 1);
    assert_int_equal(proto_pattern_match(many, 3, "y.q", 3), 1);
    /* The name is a byte range, not a C string. */
    assert_int_equal(proto_pattern_match(many, 3, "xyz", 1), 1);
    assert_int_equal(proto_pattern_match(many, 3, "x\0", 2), 0);
}

/* Find a padding length that makes the token exactly want bytes long. */
static char *token_of_length(size_t want)
{
    char claims[10000];

    for (int pad = 5500; pad < 6500; pad++) {
        char *tok;
        (void)snprintf(claims, sizeof(claims),
                       "{\"sub\":\"a\",\"exp\":1800000000,\"pad\":\"%0*d\"}", pad, 0);
        tok = make_token(claims);
        if (strlen(tok) == want)
            return tok;
        free(tok);
    }
    fail_msg("no token of %zu bytes", want);
    return NULL;
}

static void test_size_limit(void **state)
{
    char *tok;
    char *big;

    (void)state;
    tok = token_of_length(8192);
    expect(tok, AUTH_OK);
    free(tok);
    tok = token_of_length(8193);
    expect(tok, AUTH_EMALFORMED);
    free(tok);
    /* 9 KiB of anything is rejected before parsing. */
    big = malloc(9 * 1024 + 1);
    assert_non_null(big);
    memset(big, 'A', 9 * 1024);
    big[9 * 1024] = '\0';
    big[100] = '.';
    big[200] = '.';
    expect(big, AUTH_EMALFORMED);
    free(big);
}

static void test_garbage(void **state)
{
    static const char *const bad[] = {
        "",
        ".",
        "..",
        "...",
        "a.b.c",
        "eyJ.eyJ.",
        "not a token",
        "Bearer eyJhbGciOiJIUzI1NiJ9.e30.x",
        "eyJhbGciOiJIUzI1NiJ9",
        "eyJhbGciOiJIUzI1NiJ9.",
        "eyJhbGciOiJIUzI1NiJ9..",
        "eyJhbGciOiJIUzI1NiJ9.!!!!.abc",
        "e30.e30.",
        "W10.e30.",
        "\xff\xfe\xfd.\x80.\x01",
    };
    auth_token_t t;

    (void)state;
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        int rc = verify_str(bad[i], &t);
        if (rc != AUTH_EMALFORMED)
            fail_msg("'%s': got %d, want AUTH_EMALFORMED", bad[i], rc);
    }
    /* An embedded NUL: the bytes after it must not be ignored. */
    {
        char *tok = make_token("{\"sub\":\"a\",\"exp\":1800000000}");
        size_t n = strlen(tok);
        char *withnul = malloc(n + 2);
        assert_non_null(withnul);
        memcpy(withnul, tok, n);
        withnul[n] = '\0';
        withnul[n + 1] = 'x';
        assert_int_equal(auth_verify(withnul, n + 2, key, KEY_LEN, NOW, &t), AUTH_EMALFORMED);
        free(withnul);
        free(tok);
    }
    /* base64url without padding only (libjwt alone would take "e30="). */
    assert_int_equal(verify_str("eyJhbGciOiJIUzI1NiJ9.e30=.abc", &t), AUTH_EMALFORMED);
    /* Empty header or claims (libjwt 1.10 overflows a buffer on these). */
    assert_int_equal(verify_str("eyJhbGciOiJIUzI1NiJ9..abc", &t), AUTH_EMALFORMED);
    assert_int_equal(verify_str(".e30.abc", &t), AUTH_EMALFORMED);
    /* NULL token or zero length. */
    assert_int_equal(auth_verify(NULL, 0, key, KEY_LEN, NOW, &t), AUTH_EMALFORMED);
    assert_int_equal(auth_verify("x", 0, key, KEY_LEN, NOW, &t), AUTH_EMALFORMED);
}

static void test_every_truncation(void **state)
{
    const char *pub[] = {"p.*"};
    auth_token_t t, canary;
    char *tok;
    size_t n;

    (void)state;
    memset(&canary, 0x5a, sizeof(canary));
    assert_int_equal(auth_issue(key, KEY_LEN, "trunc", NOW + 3600, pub, 1, pub, 1, &tok), AUTH_OK);
    n = strlen(tok);
    for (size_t len = 0; len < n; len++) {
        char *copy = malloc(len + 1);
        assert_non_null(copy);
        memcpy(copy, tok, len);
        copy[len] = '\0';
        memset(&t, 0x5a, sizeof(t));
        int rc = auth_verify(copy, len, key, KEY_LEN, NOW, &t);
        if (rc == AUTH_OK)
            fail_msg("truncated to %zu of %zu bytes, still verifies", len, n);
        /* Output untouched on failure. */
        assert_memory_equal(&t, &canary, sizeof(t));
        free(copy);
    }
    assert_int_equal(auth_verify(tok, n, key, KEY_LEN, NOW, &t), AUTH_OK);
    auth_token_free(&t);
    free(tok);
}

static void test_issue_errors(void **state)
{
    const char *pats[65];
    char longpat[202];
    const char *lp[] = {longpat};
    const char *withnull[] = {"a", NULL};
    const char *empty[] = {""};
    char *tok = (char *)"untouched";

    (void)state;
    for (int i = 0; i < 65; i++)
        pats[i] = "p";
    memset(longpat, 'x', 201);
    longpat[201] = '\0';
    assert_int_equal(auth_issue(key, 0, "a", NOW, NULL, 0, NULL, 0, &tok), AUTH_ESIGNATURE);
    assert_int_equal(auth_issue(NULL, 4, "a", NOW, NULL, 0, NULL, 0, &tok), AUTH_ESIGNATURE);
    assert_int_equal(auth_issue(key, KEY_LEN, NULL, NOW, NULL, 0, NULL, 0, &tok), AUTH_ECLAIMS);
    assert_int_equal(auth_issue(key, KEY_LEN, "", NOW, NULL, 0, NULL, 0, &tok), AUTH_ECLAIMS);
    assert_int_equal(auth_issue(key, KEY_LEN, "a", NOW, pats, 65, NULL, 0, &tok), AUTH_ECLAIMS);
    assert_int_equal(auth_issue(key, KEY_LEN, "a", NOW, NULL, 0, pats, 65, &tok), AUTH_ECLAIMS);
    assert_int_equal(auth_issue(key, KEY_LEN, "a", NOW, lp, 1, NULL, 0, &tok), AUTH_ECLAIMS);
    assert_int_equal(auth_issue(key, KEY_LEN, "a", NOW, withnull, 2, NULL, 0, &tok), AUTH_ECLAIMS);
    assert_int_equal(auth_issue(key, KEY_LEN, "a", NOW, empty, 1, NULL, 0, &tok), AUTH_ECLAIMS);
    assert_int_equal(auth_issue(key, KEY_LEN, "a", NOW, NULL, 3, NULL, 0, &tok), AUTH_ECLAIMS);
    assert_string_equal(tok, "untouched");
    /* 64 patterns of 200 bytes fit the limits but not in 8 KiB: auth_issue
     * makes it, auth_verify rejects its size. */
    longpat[200] = '\0';
    for (int i = 0; i < 64; i++)
        pats[i] = longpat;
    assert_int_equal(auth_issue(key, KEY_LEN, "a", NOW + 9, pats, 64, NULL, 0, &tok), AUTH_OK);
    expect(tok, AUTH_EMALFORMED);
    free(tok);
}

static void test_strerror(void **state)
{
    const int codes[] = {AUTH_OK,       AUTH_EMALFORMED, AUTH_ESIGNATURE,
                         AUTH_EEXPIRED, AUTH_ECLAIMS,    AUTH_ENOMEM};

    (void)state;
    for (size_t i = 0; i < sizeof(codes) / sizeof(codes[0]); i++) {
        assert_non_null(auth_strerror(codes[i]));
        for (size_t j = 0; j < i; j++)
            assert_string_not_equal(auth_strerror(codes[i]), auth_strerror(codes[j]));
    }
    assert_non_null(auth_strerror(-999));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_round_trip),
        cmocka_unit_test(test_expiry),
        cmocka_unit_test(test_nbf),
        cmocka_unit_test(test_wrong_key),
        cmocka_unit_test(test_tampered_payload),
        cmocka_unit_test(test_alg_none),
        cmocka_unit_test(test_other_algs),
        cmocka_unit_test(test_claims_required),
        cmocka_unit_test(test_pattern_claims),
        cmocka_unit_test(test_match),
        cmocka_unit_test(test_size_limit),
        cmocka_unit_test(test_garbage),
        cmocka_unit_test(test_every_truncation),
        cmocka_unit_test(test_issue_errors),
        cmocka_unit_test(test_strerror),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

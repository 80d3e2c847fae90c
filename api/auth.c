/*
 * auth.c - HS256 JWT access tokens and stream-pattern permissions (contract
 * in auth.h).
 *
 * libjwt 1.x does the JOSE work, but its jwt_decode() returns EINVAL for
 * every kind of failure and accepts whatever algorithm the token names. So
 * auth_verify() decodes twice:
 *
 *   0. our own check of the compact form (three base64url parts), which
 *      also keeps inputs that libjwt 1.10 mishandles away from it.
 *   1. without a key: libjwt checks the structure (three parts, base64url,
 *      JSON header and claims) and skips the signature. Failure, or an "alg"
 *      header other than exactly "HS256" ("none", HS512, RS256, ...), or a
 *      "crit" header (no extensions are understood): AUTH_EMALFORMED.
 *   2. with the key: the token is known to be well formed, so a failure now
 *      is the signature: AUTH_ESIGNATURE.
 *
 * Claims are then read from the verified token only, with jansson, so that
 * types are checked exactly (libjwt's jwt_get_grant_int() returns 0 for a
 * string). Limits: tokens up to AUTH_TOKEN_MAX bytes, "sub" up to
 * AUTH_SUBJECT_MAX bytes (it becomes the WAL producer id, WAL_PRODUCER_MAX),
 * at most AUTH_PATTERNS_MAX patterns per list, each 1..AUTH_PATTERN_MAX bytes.
 * auth_issue() enforces the same limits, so whatever it makes verifies.
 *
 * Everything here is pure and thread-safe: no globals, no clock.
 */
#include "auth.h"

#include <errno.h>
#include <limits.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>
#include <jwt.h>

#define AUTH_TOKEN_MAX    8192u
#define AUTH_SUBJECT_MAX  255u
#define AUTH_PATTERNS_MAX 64u
#define AUTH_PATTERN_MAX  200u

const char *auth_strerror(int err)
{
    switch (err) {
    case AUTH_OK:
        return "ok";
    case AUTH_EMALFORMED:
        return "malformed token";
    case AUTH_ESIGNATURE:
        return "bad signature";
    case AUTH_EEXPIRED:
        return "token expired or not yet valid";
    case AUTH_ECLAIMS:
        return "missing or invalid claims";
    case AUTH_ENOMEM:
        return "out of memory";
    default:
        return "unknown error";
    }
}

static void free_patterns(char **list, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free(list[i]);
    free(list);
}

/* A valid pattern: a string of 1..AUTH_PATTERN_MAX bytes without NUL. */
static bool pattern_ok(const char *s, size_t len)
{
    return len > 0 && len <= AUTH_PATTERN_MAX && memchr(s, '\0', len) == NULL;
}

/* Copy the optional array-of-strings claim `name` out of claims. An absent
 * claim gives an empty list. */
static int claim_patterns(json_t *claims, const char *name, char ***ret_list, size_t *ret_n)
{
    json_t *arr = json_object_get(claims, name);
    char **list;
    size_t n;

    if (arr == NULL) {
        *ret_list = NULL;
        *ret_n = 0;
        return AUTH_OK;
    }
    if (!json_is_array(arr) || json_array_size(arr) > AUTH_PATTERNS_MAX)
        return AUTH_ECLAIMS;
    n = json_array_size(arr);
    if (n == 0) {
        *ret_list = NULL;
        *ret_n = 0;
        return AUTH_OK;
    }
    for (size_t i = 0; i < n; i++) {
        json_t *v = json_array_get(arr, i);
        if (!json_is_string(v) || !pattern_ok(json_string_value(v), json_string_length(v)))
            return AUTH_ECLAIMS;
    }
    list = calloc(n, sizeof(*list));
    if (list == NULL)
        return AUTH_ENOMEM;
    for (size_t i = 0; i < n; i++) {
        list[i] = strdup(json_string_value(json_array_get(arr, i)));
        if (list[i] == NULL) {
            free_patterns(list, i);
            return AUTH_ENOMEM;
        }
    }
    *ret_list = list;
    *ret_n = n;
    return AUTH_OK;
}

/* Read and check the claims of a verified token into *t (which the caller
 * frees with auth_token_free, also on failure). */
static int read_claims(jwt_t *jwt, int64_t now, auth_token_t *t)
{
    char *text = jwt_get_grants_json(jwt, NULL);
    json_error_t jerr;
    json_t *claims, *sub, *exp, *nbf;
    int rc;

    if (text == NULL)
        return AUTH_ENOMEM;
    claims = json_loads(text, 0, &jerr);
    free(text);
    if (claims == NULL)
        return json_error_code(&jerr) == json_error_out_of_memory ? AUTH_ENOMEM : AUTH_EMALFORMED;
    if (!json_is_object(claims)) {
        rc = AUTH_EMALFORMED; /* a JWT claims set is an object */
        goto done;
    }

    sub = json_object_get(claims, "sub");
    exp = json_object_get(claims, "exp");
    nbf = json_object_get(claims, "nbf");
    if (!json_is_string(sub) || !auth_subject_ok(json_string_value(sub), json_string_length(sub)) ||
        !json_is_integer(exp) || (nbf != NULL && !json_is_integer(nbf))) {
        rc = AUTH_ECLAIMS;
        goto done;
    }
    if ((int64_t)json_integer_value(exp) <= now ||
        (nbf != NULL && (int64_t)json_integer_value(nbf) > now)) {
        rc = AUTH_EEXPIRED;
        goto done;
    }
    t->expires = (int64_t)json_integer_value(exp);
    t->subject = strdup(json_string_value(sub));
    if (t->subject == NULL) {
        rc = AUTH_ENOMEM;
        goto done;
    }
    rc = claim_patterns(claims, "pub", &t->pub, &t->n_pub);
    if (rc == AUTH_OK)
        rc = claim_patterns(claims, "subscribe", &t->subs, &t->n_subs);

done:
    json_decref(claims);
    return rc;
}

static bool b64url_char(char c)
{
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' ||
           c == '_';
}

/*
 * The JWS compact form (RFC 7515): three base64url parts without padding,
 * split by '.', the header and claims non-empty. Checked before libjwt sees
 * the token: libjwt 1.10 writes past a zero-size buffer when a part is empty.
 * A part of 4n+1 characters is never valid base64.
 */
static bool token_shape_ok(const char *tok, size_t len)
{
    size_t part = 0, part_len = 0;

    for (size_t i = 0; i < len; i++) {
        if (tok[i] == '.') {
            if (part == 2 || part_len == 0 || part_len % 4 == 1)
                return false;
            part++;
            part_len = 0;
        } else if (b64url_char(tok[i])) {
            part_len++;
        } else {
            return false;
        }
    }
    return part == 2 && part_len % 4 != 1;
}

int auth_verify(const char *token, size_t token_len, const uint8_t *key, size_t key_len,
                int64_t now, auth_token_t *out)
{
    auth_token_t t = {0};
    jwt_t *shape = NULL, *jwt = NULL;
    char *tok = NULL;
    const char *alg;
    char *crit;
    int rc;

    if (token == NULL || token_len > AUTH_TOKEN_MAX || !token_shape_ok(token, token_len))
        return AUTH_EMALFORMED;
    if (key == NULL || key_len == 0 || key_len > INT_MAX)
        return AUTH_ESIGNATURE; /* nothing verifies without a key */
    tok = malloc(token_len + 1);
    if (tok == NULL)
        return AUTH_ENOMEM;
    memcpy(tok, token, token_len);
    tok[token_len] = '\0';

    /* Pass 1: structure and header, no signature. */
    rc = jwt_decode(&shape, tok, NULL, 0);
    if (rc != 0) {
        rc = rc == ENOMEM ? AUTH_ENOMEM : AUTH_EMALFORMED;
        goto done;
    }
    alg = jwt_get_header(shape, "alg");
    if (alg == NULL || strcmp(alg, "HS256") != 0) {
        rc = AUTH_EMALFORMED;
        goto done;
    }
    crit = jwt_get_headers_json(shape, "crit");
    if (crit != NULL) {
        free(crit);
        rc = AUTH_EMALFORMED;
        goto done;
    }

    /* Pass 2: the signature. */
    rc = jwt_decode(&jwt, tok, key, (int)key_len);
    if (rc != 0) {
        rc = rc == ENOMEM ? AUTH_ENOMEM : AUTH_ESIGNATURE;
        goto done;
    }
    if (jwt_get_alg(jwt) != JWT_ALG_HS256) {
        rc = AUTH_EMALFORMED;
        goto done;
    }

    rc = read_claims(jwt, now, &t);
    if (rc == AUTH_OK) {
        *out = t;
        memset(&t, 0, sizeof(t));
    }

done:
    auth_token_free(&t);
    jwt_free(jwt);
    jwt_free(shape);
    free(tok);
    return rc;
}

void auth_token_free(auth_token_t *t)
{
    if (t == NULL)
        return;
    free(t->subject);
    free_patterns(t->pub, t->n_pub);
    free_patterns(t->subs, t->n_subs);
    memset(t, 0, sizeof(*t));
}

/* Add {"name": [patterns...]} to the token's claims. */
static int add_patterns(jwt_t *jwt, const char *name, const char *const *list, size_t n)
{
    json_t *obj = json_object();
    json_t *arr = json_array();
    char *text = NULL;
    int rc = AUTH_ENOMEM;

    if (obj == NULL || arr == NULL)
        goto done;
    for (size_t i = 0; i < n; i++) {
        if (json_array_append_new(arr, json_string(list[i])) != 0)
            goto done;
    }
    if (json_object_set(obj, name, arr) != 0)
        goto done;
    text = json_dumps(obj, JSON_COMPACT);
    if (text == NULL)
        goto done;
    if (jwt_add_grants_json(jwt, text) == 0)
        rc = AUTH_OK;

done:
    free(text);
    json_decref(arr);
    json_decref(obj);
    return rc;
}

static bool patterns_ok(const char *const *list, size_t n)
{
    if (n > AUTH_PATTERNS_MAX || (n > 0 && list == NULL))
        return false;
    for (size_t i = 0; i < n; i++) {
        if (list[i] == NULL || !pattern_ok(list[i], strlen(list[i])))
            return false;
    }
    return true;
}

int auth_subject_ok(const char *s, size_t len)
{
    size_t rl = sizeof(AUTH_RESERVED_PREFIX) - 1;
    if (len == 0 || len > AUTH_SUBJECT_MAX ||
        (len >= rl && memcmp(s, AUTH_RESERVED_PREFIX, rl) == 0))
        return 0;
    for (size_t i = 0; i < len; i++)
        if ((unsigned char)s[i] < 0x20 || s[i] == 0x7f)
            return 0;
    return 1;
}

int auth_issue(const uint8_t *key, size_t key_len, const char *subject, int64_t expires,
               const char *const *pub, size_t n_pub, const char *const *subs, size_t n_subs,
               char **ret)
{
    jwt_t *jwt = NULL;
    char *text;
    int rc;

    if (key == NULL || key_len == 0 || key_len > INT_MAX)
        return AUTH_ESIGNATURE;
    if (subject == NULL || !auth_subject_ok(subject, strlen(subject)) || !patterns_ok(pub, n_pub) ||
        !patterns_ok(subs, n_subs))
        return AUTH_ECLAIMS;
#if LONG_MAX < INT64_MAX
    if (expires > LONG_MAX || expires < LONG_MIN)
        return AUTH_ECLAIMS;
#endif
    if (jwt_new(&jwt) != 0)
        return AUTH_ENOMEM;
    rc = AUTH_ENOMEM;
    if (jwt_add_grant(jwt, "sub", subject) != 0 ||
        jwt_add_grant_int(jwt, "exp", (long)expires) != 0)
        goto done;
    if (n_pub > 0 && (rc = add_patterns(jwt, "pub", pub, n_pub)) != AUTH_OK)
        goto done;
    if (n_subs > 0 && (rc = add_patterns(jwt, "subscribe", subs, n_subs)) != AUTH_OK)
        goto done;
    rc = AUTH_ENOMEM;
    if (jwt_set_alg(jwt, JWT_ALG_HS256, key, (int)key_len) != 0)
        goto done;
    text = jwt_encode_str(jwt);
    if (text == NULL)
        goto done;
    *ret = text;
    rc = AUTH_OK;

done:
    jwt_free(jwt);
    return rc;
}

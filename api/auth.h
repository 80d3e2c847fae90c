/*
 * auth.h - JWT (HS256) access tokens and stream-pattern permissions.
 * Pure checks: the caller supplies the key and the current time.
 */
#ifndef ARQ_API_AUTH_H
#define ARQ_API_AUTH_H

#include <stddef.h>
#include <stdint.h>

enum {
    AUTH_OK = 0,
    AUTH_EMALFORMED = -1, /* not a JWT, bad base64/JSON, wrong alg */
    AUTH_ESIGNATURE = -2, /* signature does not verify */
    AUTH_EEXPIRED = -3,   /* exp in the past (or nbf in the future) */
    AUTH_ECLAIMS = -4,    /* missing/invalid sub, exp, pub or sub claims */
    AUTH_ENOMEM = -5,
};
const char *auth_strerror(int err);

/*
 * Claims ARQ reads: "sub" (string, the subject), "exp" (number, required),
 * optional "nbf", "pub" and "subscribe" (arrays of stream patterns). A
 * pattern is a stream name, or a prefix ending in ".*" (matches one or more
 * further dot-separated segments), or "*" (everything).
 */
typedef struct auth_token {
    char *subject;
    int64_t expires; /* unix seconds */
    char **pub;      /* publish patterns */
    size_t n_pub;
    char **subs; /* subscribe patterns */
    size_t n_subs;
} auth_token_t;

/* Verify token (HS256 with key) at time now (unix seconds) and extract its
 * claims. Tokens longer than 8 KiB are malformed. */
int auth_verify(const char *token, size_t token_len, const uint8_t *key, size_t key_len,
                int64_t now, auth_token_t *out);
void auth_token_free(auth_token_t *t);

/*
 * Producer namespaces. A token's subject is its dedup namespace (the WAL's
 * producer); arqd names the others with the reserved prefix "arq:" (an
 * anonymous session: "arq:session:<id>", a server API key:
 * "arq:api:<key id>"), which no subject may start with, so that no token
 * can take (or block) another's message ids. Subjects are also 1 to
 * AUTH_SUBJECT_MAX bytes without control characters.
 */
#define AUTH_RESERVED_PREFIX "arq:"
int auth_subject_ok(const char *subject, size_t len);

/* Patterns are matched with proto_pattern_match (proto/proto.h). */

/* Make a token (for tests and the arq CLI's dev mode). *ret is malloc'd. */
int auth_issue(const uint8_t *key, size_t key_len, const char *subject, int64_t expires,
               const char *const *pub, size_t n_pub, const char *const *subs, size_t n_subs,
               char **ret);

#endif

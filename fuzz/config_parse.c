/*
 * Fuzz the configuration parser: apply the input as an INI document onto the
 * defaults, then print and free. Whatever the input, the error message is a
 * terminated string and the printed text shows secrets as "***".
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    arq_config_t cfg;
    char err[256];
    char *text = NULL;

    if (arq_config_defaults(&cfg) != 0)
        return 0;
    memset(err, 'x', sizeof(err));
    if (arq_config_apply_ini(&cfg, (const char *)data, size, err, sizeof(err)) != 0 &&
        memchr(err, '\0', sizeof(err)) == NULL)
        abort();
    if (arq_config_print(&cfg, &text) == 0) {
        /* Secrets print as "***" (their bytes may still turn up inside
         * another value, so look at the lines themselves). */
        if ((cfg.secret_key != NULL && strstr(text, "\nsecret_key = ***\n") == NULL) ||
            (cfg.api_key != NULL && strstr(text, "\napi_key = ***\n") == NULL))
            abort();
        free(text);
    }
    arq_config_free(&cfg);
    return 0;
}

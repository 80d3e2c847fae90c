/* sync_internal.h - shared inside sync/ only. */
#ifndef ARQ_SYNC_INTERNAL_H
#define ARQ_SYNC_INTERNAL_H

#include <stddef.h>

typedef struct sync_migration {
    int version;
    const char *name;
    const char *sql;
    size_t len;
} sync_migration_t;

extern const sync_migration_t sync_migrations[];
extern const size_t sync_n_migrations;

#endif

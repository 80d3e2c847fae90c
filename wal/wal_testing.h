/*
 * wal_testing.h - fault injection for tests only (not used by programs).
 * A test double at the one place no real fault can be provoked on demand:
 * the result of an LMDB commit.
 */
#ifndef ARQ_WAL_TESTING_H
#define ARQ_WAL_TESTING_H

#include "wal.h"

/*
 * Make the writer's next `count` commits fail as if mdb_txn_commit had
 * returned errno `err` (the transaction is aborted instead of committed).
 * EIO (or any error other than ENOSPC/EDQUOT) makes the WAL fail-stop:
 * the batch and every later append fail with WAL_EFATAL. ENOSPC fails the
 * batch with WAL_EFULL and the WAL keeps working.
 */
void wal_testing_fail_commits(wal_t *wal, int err, unsigned count);

#endif

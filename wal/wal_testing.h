/*
 * wal_testing.h - fault injection for tests only (not used by programs).
 * Test doubles at the places no real fault can be provoked on demand: the
 * result of an LMDB commit, of a fold, and of an allocation of disk blocks.
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

/*
 * Make the next `count` allocations of disk blocks for data.mdb fail with
 * ENOSPC, and the filesystem look full to the WAL meanwhile, as on a full
 * disk (UINT32_MAX: every one until called again with 0). The map then cannot grow: appends that need more room fail with
 * WAL_EFULL and the state becomes WAL_STATE_FULL.
 */
void wal_testing_fail_alloc(wal_t *wal, unsigned count);

/*
 * Make the next `count` folds of the journal into LMDB fail as if their
 * mdb_txn_commit had returned errno `err`. ENOSPC defers the fold: every
 * append is refused with WAL_EFULL until a retry (every second, or
 * wal_testing_retry_now) folds the journal. EIO fail-stops the WAL.
 */
void wal_testing_fail_folds(wal_t *wal, int err, unsigned count);
/* Wake the writer to retry what "storage full" waits for now. */
void wal_testing_retry_now(wal_t *wal);

#endif

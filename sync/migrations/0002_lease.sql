-- 0002_lease: one active arqd per database (docs/ha.md "Lease and fencing").
-- The single row names the node that may drain into this database and
-- until when (the MySQL server's clock, unix microseconds). Every drain
-- transaction ends with an UPDATE of this row that names the generation the
-- node acquired: a node that lost the lease (a higher generation was taken)
-- updates no row, rolls back and stops. wal_id is the created_us of the
-- owner's WAL: the WAL whose sequences arq_sync_state's watermark counts.
-- conn_id and conn_server (@@hostname:@@port) name the owner's drain
-- connection, which a node taking an expired lease kills on that server
-- (a paused owner may hold row locks there).
-- handoff = 1 asks the owner to drain, release and stand by (switchover).
CREATE TABLE arq_lease (
  id          TINYINT UNSIGNED NOT NULL,
  owner       VARBINARY(255) NOT NULL,
  generation  BIGINT UNSIGNED NOT NULL,
  expires_us  BIGINT NOT NULL,
  conn_id     BIGINT UNSIGNED NOT NULL,
  conn_server VARBINARY(255) NOT NULL,
  wal_id      BIGINT NOT NULL,
  handoff     TINYINT UNSIGNED NOT NULL,
  updated_us  BIGINT NOT NULL,
  PRIMARY KEY (id)
) ENGINE=InnoDB;

INSERT INTO arq_lease (id, owner, generation, expires_us, conn_id, conn_server, wal_id, handoff,
  updated_us) VALUES (1, '', 0, 0, 0, '', 0, 0, 0);

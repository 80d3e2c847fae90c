-- 0001_init: the tables the WAL drains into. Applied once, recorded in
-- arq_schema_migrations with its checksum; never edit it after a release:
-- add 0002_... instead.
CREATE TABLE arq_streams (
  name        VARCHAR(255) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
  id          INT UNSIGNED NOT NULL,
  epoch       BIGINT UNSIGNED NOT NULL,
  created_us  BIGINT NOT NULL,
  PRIMARY KEY (name)
) ENGINE=InnoDB;

CREATE TABLE arq_messages (
  stream      VARCHAR(255) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
  `offset`    BIGINT UNSIGNED NOT NULL,
  seq         BIGINT UNSIGNED NOT NULL,
  direction   TINYINT UNSIGNED NOT NULL,
  producer    VARBINARY(255) NOT NULL,
  msgid       VARBINARY(255) NOT NULL,
  ts_us       BIGINT NOT NULL,
  headers     BLOB NOT NULL,
  payload     LONGBLOB NOT NULL,
  checksum    BIGINT UNSIGNED NOT NULL,
  PRIMARY KEY (stream, `offset`),
  UNIQUE KEY seq (seq)
) ENGINE=InnoDB;

CREATE TABLE arq_cursors (
  session     VARBINARY(255) NOT NULL,
  stream      VARCHAR(255) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
  `offset`    BIGINT UNSIGNED NOT NULL,
  updated_us  BIGINT NOT NULL,
  PRIMARY KEY (session, stream)
) ENGINE=InnoDB;

CREATE TABLE arq_sync_state (
  id            TINYINT UNSIGNED NOT NULL,
  watermark_seq BIGINT UNSIGNED NOT NULL,
  updated_us    BIGINT NOT NULL,
  PRIMARY KEY (id)
) ENGINE=InnoDB;

INSERT INTO arq_sync_state (id, watermark_seq, updated_us) VALUES (1, 0, 0);

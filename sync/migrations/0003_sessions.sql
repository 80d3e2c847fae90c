-- 0003_sessions: the sessions a client resumes with, copied from the WAL by
-- the drain thread (latest write wins, like arq_cursors), so that a node
-- rebuilt from MySQL (a standby taking over, arq-replay restore) resumes
-- them. secret is the digest of the resume token (never the token).
CREATE TABLE arq_sessions (
  session     VARBINARY(255) NOT NULL,
  owner       VARBINARY(255) NOT NULL,
  secret      VARBINARY(64) NOT NULL,
  created_us  BIGINT NOT NULL,
  seen_us     BIGINT NOT NULL,
  updated_us  BIGINT NOT NULL,
  PRIMARY KEY (session)
) ENGINE=InnoDB;

-- mesh schema v3 (postgres): audit rows carry the id of the record they came from.
-- The HTTP API publishes each change as an audit record; the sink appends it
-- with its id in ref, and a redelivered record (a crash between the commit and
-- the ack) finds the unique index and adds nothing. Rows the sink writes for
-- the registry mirror have no ref (NULLs never collide).

ALTER TABLE audit_log ADD COLUMN ref TEXT;
CREATE UNIQUE INDEX IF NOT EXISTS audit_log_ref ON audit_log (ref);

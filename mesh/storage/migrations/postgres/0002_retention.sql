-- mesh schema v2 (PostgreSQL): indexes for retention.
-- Pruning walks each table in time order, a bounded batch at a time; without
-- these every batch would scan the whole table. Events age by received_at (the
-- sink's clock), not by the publisher's "time", which a client sets as it likes.

CREATE INDEX IF NOT EXISTS events_received_at ON events (received_at, id);
CREATE INDEX IF NOT EXISTS deliveries_at ON deliveries (at, id);
CREATE INDEX IF NOT EXISTS dead_letters_dead_at ON dead_letters (dead_at, id);
CREATE INDEX IF NOT EXISTS health_checks_at ON health_checks (at);
-- Not CONCURRENTLY: migrations run in a transaction. On a large existing
-- database the build blocks writes to these tables for its duration; the sink
-- holds its batches (unacked) meanwhile and loses nothing.

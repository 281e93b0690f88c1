-- mesh schema v1 (SQLite).
-- Times are ISO 8601 text in UTC with microseconds ("2024-05-01T12:00:00.000000+00:00"),
-- so text order is time order. JSON columns are text. Payloads are the bytes as
-- stored in JetStream (a Fernet token when encrypted = 1), never plaintext of an
-- encrypted event.

CREATE TABLE events (
    id              TEXT PRIMARY KEY,
    stream_seq      INTEGER,
    subject         TEXT NOT NULL,              -- NATS subject the event was stored under
    source          TEXT NOT NULL,
    type            TEXT NOT NULL,
    time            TEXT NOT NULL,
    datacontenttype TEXT,
    ce_subject      TEXT,                       -- CloudEvents "subject" attribute
    origin          TEXT,
    hops            INTEGER NOT NULL DEFAULT 0,
    payload         BLOB NOT NULL,
    encrypted       INTEGER NOT NULL DEFAULT 0,
    received_at     TEXT NOT NULL
);
CREATE INDEX events_source_time ON events (source, time);
CREATE INDEX events_type_time ON events (type, time);
CREATE INDEX events_time ON events (time);

CREATE TABLE deliveries (
    id          TEXT PRIMARY KEY,
    event_id    TEXT NOT NULL,
    target      TEXT NOT NULL,
    attempt     INTEGER NOT NULL,
    outcome     TEXT NOT NULL,
    status_code INTEGER,
    latency_ms  REAL,
    error       TEXT,
    at          TEXT NOT NULL,
    instance    TEXT
);
CREATE INDEX deliveries_event ON deliveries (event_id);
CREATE INDEX deliveries_target_at ON deliveries (target, at);

CREATE TABLE dead_letters (
    id          TEXT PRIMARY KEY,
    event_id    TEXT NOT NULL,
    target      TEXT NOT NULL,
    attempts    INTEGER NOT NULL,
    last_error  TEXT,
    payload     BLOB NOT NULL,
    encrypted   INTEGER NOT NULL DEFAULT 0,
    dead_at     TEXT NOT NULL,
    stream_seq  INTEGER
);
CREATE INDEX dead_letters_target ON dead_letters (target, dead_at);

CREATE TABLE health_checks (
    service  TEXT NOT NULL,
    instance TEXT NOT NULL,
    at       TEXT NOT NULL,
    status   TEXT NOT NULL,
    stats    TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (service, instance, at)
);

CREATE TABLE services (
    name       TEXT PRIMARY KEY,
    kind       TEXT NOT NULL,
    config     TEXT NOT NULL DEFAULT '{}',
    status     TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);

CREATE TABLE propagations (
    id         TEXT PRIMARY KEY,
    mode       TEXT NOT NULL,
    source     TEXT NOT NULL,
    targets    TEXT NOT NULL DEFAULT '[]',
    types      TEXT,
    created_at TEXT NOT NULL
);

CREATE TABLE audit_log (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    at     TEXT NOT NULL,
    actor  TEXT NOT NULL,
    action TEXT NOT NULL,
    entity TEXT NOT NULL,
    before TEXT,
    after  TEXT
);
CREATE INDEX audit_log_entity ON audit_log (entity, id);

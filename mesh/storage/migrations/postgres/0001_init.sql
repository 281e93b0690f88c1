-- mesh schema v1 (PostgreSQL). Tables land in the first schema on search_path.
-- Payloads are the bytes as stored in JetStream (a Fernet token when encrypted),
-- never plaintext of an encrypted event.

CREATE TABLE events (
    id              TEXT PRIMARY KEY,
    stream_seq      BIGINT,
    subject         TEXT NOT NULL,              -- NATS subject the event was stored under
    source          TEXT NOT NULL,
    type            TEXT NOT NULL,
    time            TIMESTAMPTZ NOT NULL,
    datacontenttype TEXT,
    ce_subject      TEXT,                       -- CloudEvents "subject" attribute
    origin          TEXT,
    hops            INTEGER NOT NULL DEFAULT 0,
    payload         BYTEA NOT NULL,
    encrypted       BOOLEAN NOT NULL DEFAULT FALSE,
    received_at     TIMESTAMPTZ NOT NULL
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
    latency_ms  DOUBLE PRECISION,
    error       TEXT,
    at          TIMESTAMPTZ NOT NULL,
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
    payload     BYTEA NOT NULL,
    encrypted   BOOLEAN NOT NULL DEFAULT FALSE,
    dead_at     TIMESTAMPTZ NOT NULL,
    stream_seq  BIGINT
);
CREATE INDEX dead_letters_target ON dead_letters (target, dead_at);

CREATE TABLE health_checks (
    service  TEXT NOT NULL,
    instance TEXT NOT NULL,
    at       TIMESTAMPTZ NOT NULL,
    status   TEXT NOT NULL,
    stats    JSONB NOT NULL DEFAULT '{}',
    PRIMARY KEY (service, instance, at)
);

CREATE TABLE services (
    name       TEXT PRIMARY KEY,
    kind       TEXT NOT NULL,
    config     JSONB NOT NULL DEFAULT '{}',
    status     TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL
);

CREATE TABLE propagations (
    id         TEXT PRIMARY KEY,
    mode       TEXT NOT NULL,
    source     TEXT NOT NULL,
    targets    JSONB NOT NULL DEFAULT '[]',
    types      TEXT,
    created_at TIMESTAMPTZ NOT NULL
);

CREATE TABLE audit_log (
    id     BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at     TIMESTAMPTZ NOT NULL,
    actor  TEXT NOT NULL,
    action TEXT NOT NULL,
    entity TEXT NOT NULL,
    before JSONB,
    after  JSONB
);
CREATE INDEX audit_log_entity ON audit_log (entity, id);

-- mesh schema v4 (postgres): every event, delivery attempt and dead letter belongs to a
-- tenant (mesh/tenants.py). Rows written before are 'default', except events whose
-- source is a tenant's qualified source '~T.<source>' (and their attempts): tenant T.

ALTER TABLE events ADD COLUMN tenant TEXT NOT NULL DEFAULT 'default';
ALTER TABLE deliveries ADD COLUMN tenant TEXT NOT NULL DEFAULT 'default';
ALTER TABLE dead_letters ADD COLUMN tenant TEXT NOT NULL DEFAULT 'default';
UPDATE events SET tenant = split_part(substr(source, 2), '.', 1)
    WHERE source LIKE '~%.%';
UPDATE deliveries d SET tenant = e.tenant FROM events e
    WHERE e.id = d.event_id AND e.tenant <> 'default';
CREATE INDEX events_tenant_time ON events (tenant, time);

-- mesh schema v4 (sqlite): every event, delivery attempt and dead letter belongs to a
-- tenant (mesh/tenants.py). Rows written before are 'default', except events whose
-- source is a tenant's qualified source '~T.<source>' (and their attempts): tenant T.

ALTER TABLE events ADD COLUMN tenant TEXT NOT NULL DEFAULT 'default';
ALTER TABLE deliveries ADD COLUMN tenant TEXT NOT NULL DEFAULT 'default';
ALTER TABLE dead_letters ADD COLUMN tenant TEXT NOT NULL DEFAULT 'default';
UPDATE events SET tenant = substr(source, 2, instr(source, '.') - 2)
    WHERE source LIKE '~%.%';
UPDATE deliveries SET tenant = (SELECT e.tenant FROM events e WHERE e.id = deliveries.event_id)
    WHERE event_id IN (SELECT id FROM events WHERE tenant <> 'default');
CREATE INDEX events_tenant_time ON events (tenant, time);

-- mesh schema v4: the W3C trace id an event carried, on each delivery attempt
-- (issue #21: `mesh trace EVENT_ID`, and a link into a tracing back end).
-- Numbered 4: 3 is taken by the audit reference of the HTTP API's branch.

ALTER TABLE deliveries ADD COLUMN trace_id TEXT;

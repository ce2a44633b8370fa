-- Audit records the relay could not publish however it tried (too large for NATS
-- even with their free text shortened): kept here with the reason, out of the
-- outbox so that the records after them are published. Watched by a metric and an
-- alert rule; nothing is dropped silently.
CREATE TABLE IF NOT EXISTS voucher_audit_dead_letters (
    seq BIGINT PRIMARY KEY,
    event_id UUID NOT NULL,
    code TEXT NOT NULL,
    kind TEXT NOT NULL,
    occurred_at TIMESTAMPTZ NOT NULL,
    payload JSONB NOT NULL,
    error TEXT NOT NULL,
    failed_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The operator's additions. Only new columns and new tables: nothing of the
-- billing service's schema is dropped, renamed or retyped.

-- The redemption window of a Voucher (spec.validFrom / spec.expiresAt).
ALTER TABLE promo_codes ADD COLUMN IF NOT EXISTS valid_from TIMESTAMPTZ NULL;
ALTER TABLE promo_codes ADD COLUMN IF NOT EXISTS expires_at TIMESTAMPTZ NULL;

-- One Voucher resource owns one code. `generation` is the resource generation
-- last applied, which tells a spec change from an out-of-band edit of the row.
CREATE TABLE IF NOT EXISTS voucher_bindings (
    code TEXT PRIMARY KEY REFERENCES promo_codes(code),
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    uid TEXT NOT NULL UNIQUE,
    generation BIGINT NOT NULL DEFAULT 0,
    bound_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Audit records, written in the transaction of the change they describe and
-- published to JetStream by the relay in `seq` order.
CREATE TABLE IF NOT EXISTS voucher_audit_outbox (
    seq BIGSERIAL PRIMARY KEY,
    event_id UUID NOT NULL UNIQUE,
    code TEXT NOT NULL,
    kind TEXT NOT NULL,
    occurred_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    payload JSONB NOT NULL,
    published_at TIMESTAMPTZ NULL
);
CREATE INDEX IF NOT EXISTS voucher_audit_outbox_unpublished
    ON voucher_audit_outbox (seq) WHERE published_at IS NULL;

-- Answers to redemption requests by Idempotency-Key, per token subject.
CREATE TABLE IF NOT EXISTS voucher_idempotency_keys (
    subject TEXT NOT NULL,
    key TEXT NOT NULL,
    request_hash BYTEA NOT NULL,
    status SMALLINT NULL,
    response JSONB NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (subject, key)
);

-- VoucherCampaigns: one resource that issues many codes, each an ordinary promo_codes
-- row. These tables say which campaign issued a code, as which index, and how far
-- generation got, so that it resumes after a crash or a leader change with no
-- duplicate and no gap. Nothing of the billing service's schema changes.
CREATE TABLE IF NOT EXISTS voucher_campaigns (
    uid TEXT PRIMARY KEY,
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    -- Codes 0 .. generated - 1 exist.
    generated INT NOT NULL DEFAULT 0,
    -- Codes 0 .. audited - 1 are named by a campaign_generated audit record.
    audited INT NOT NULL DEFAULT 0,
    -- The resource generation and the terms last applied to every code.
    generation BIGINT NOT NULL DEFAULT 0,
    terms JSONB NULL,
    deletion_policy TEXT NOT NULL DEFAULT 'Revoke',
    -- A keyed fingerprint of the generator key that made codes 0 .. generated - 1:
    -- another key would make other codes.
    key_fingerprint TEXT NULL,
    -- Deleting the campaign: codes 0 .. released - 1 are revoked (or left, with
    -- Orphan); when every code is, released_at is set. The campaign's codes stay
    -- its own after that, so that nothing adopts or revives them implicitly.
    released INT NOT NULL DEFAULT 0,
    released_at TIMESTAMPTZ NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS voucher_campaign_codes (
    code TEXT PRIMARY KEY REFERENCES promo_codes(code),
    campaign_uid TEXT NOT NULL REFERENCES voucher_campaigns(uid),
    code_index INT NOT NULL,
    UNIQUE (campaign_uid, code_index)
);

-- A campaign's bulk statements (thousands of rows at once) set voucher_operator.bulk
-- for their transaction and send one notification, '*' (every code may have changed),
-- instead of one per row.
CREATE OR REPLACE FUNCTION voucher_operator_notify_code() RETURNS trigger AS $$
BEGIN
    IF current_setting('voucher_operator.bulk', true) = 'on' THEN
        RETURN NULL;
    END IF;
    PERFORM pg_notify('voucher_operator_codes', COALESCE(NEW.code, OLD.code));
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

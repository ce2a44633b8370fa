-- Discount vouchers (DESIGN §10). A code grants a credit (credit_omr, as the billing service
-- knows it) or a discount: its terms beside the row, in the form answers show them
-- ({"percent_off" | "amount_off", "applies_to", "duration_months"}), with credit_omr 0 (the
-- billing service's column cannot be NULL).
ALTER TABLE promo_codes ADD COLUMN IF NOT EXISTS discount JSONB NULL;

-- A discount's terms in one form, however a writer spelled them (psql may leave appliesTo out,
-- the operator writes []): what the redemption compares the row with.
CREATE OR REPLACE FUNCTION voucher_operator_discount_terms(d JSONB) RETURNS JSONB
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN d IS NULL OR jsonb_typeof(d) = 'null' THEN NULL ELSE jsonb_build_object(
        'percent_off', d->'percent_off', 'amount_off', d->'amount_off',
        'applies_to', COALESCE(d->'applies_to', '[]'::jsonb),
        'duration_months', d->'duration_months') END
$$;

-- What a customer's redemption of a discount code granted: the terms as they were then (a later
-- change of the Voucher does not touch them), from starts_at until ends_at (NULL: a once-grant
-- without an end). ended_at: the grant ended early (its redemption reversed). Money is integer
-- minor units of `currency`.
CREATE TABLE IF NOT EXISTS voucher_discount_grants (
    grant_id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    customer_id UUID NOT NULL REFERENCES customers(id),
    code TEXT NOT NULL REFERENCES promo_codes(code),
    percent_off INT NULL CHECK (percent_off BETWEEN 1 AND 100),
    amount_off BIGINT NULL CHECK (amount_off >= 1),
    applies_to TEXT[] NOT NULL DEFAULT '{}',
    duration_months INT NULL CHECK (duration_months BETWEEN 1 AND 36),
    currency TEXT NOT NULL,
    starts_at TIMESTAMPTZ NOT NULL,
    ends_at TIMESTAMPTZ NULL,
    ended_at TIMESTAMPTZ NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK ((percent_off IS NULL) <> (amount_off IS NULL)),
    CHECK (ends_at IS NULL OR ends_at > starts_at)
);
-- One live grant per customer and code (as one redemption per customer and code); the guard's
-- probe, and the checkout's list of a customer's grants.
CREATE UNIQUE INDEX IF NOT EXISTS voucher_discount_grants_live
    ON voucher_discount_grants (customer_id, code) WHERE ended_at IS NULL;

-- The guard's discount rule (§13): a discount code is consumed only with the customer's grant,
-- which only the operator's redemption writes. The billing service's legacy checkout (a
-- promo_redemptions row, a credit_ledger row of credit_omr = 0) is refused, not fooled into
-- granting nothing. Checked at commit (a deferred constraint trigger), so that the operator's
-- redemption may write the redemption before the grant in one transaction; SET CONSTRAINTS
-- can move the check earlier, never switch it off.
CREATE OR REPLACE FUNCTION voucher_operator_guard_discount() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM promo_codes p WHERE p.code = NEW.code AND p.discount IS NOT NULL)
       AND NOT EXISTS (SELECT 1 FROM voucher_discount_grants g
                        WHERE g.customer_id = NEW.customer_id AND g.code = NEW.code
                          AND g.ended_at IS NULL) THEN
        RAISE EXCEPTION 'voucher code % grants a discount: only voucher-operator''s redemption (POST /billing/vouchers/redeem) consumes it, writing the customer''s discount grant',
            NEW.code
            USING ERRCODE = 'VG001', HINT = 'voucher-operator guard: discount codes';
    END IF;
    RETURN NULL;
END;
$$;

-- Its probes are point lookups on unique indexes: a plan cached while the grants table was
-- small (a sequential scan) would otherwise be kept as it grows, and every redemption of a
-- discount code would read the whole table at commit.
DO $$
BEGIN
    EXECUTE format(
        'ALTER FUNCTION voucher_operator_guard_discount() SET search_path = %I, pg_catalog, pg_temp',
        current_schema());
END;
$$;
ALTER FUNCTION voucher_operator_guard_discount() SET enable_seqscan = off;

DROP TRIGGER IF EXISTS voucher_operator_guard_discount ON promo_redemptions;
CREATE CONSTRAINT TRIGGER voucher_operator_guard_discount
    AFTER INSERT ON promo_redemptions
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION voucher_operator_guard_discount();

-- A grant's terms are what its customer redeemed: no writer changes or deletes them (there is
-- no drift to revert). Only ended_at may be set, once.
CREATE OR REPLACE FUNCTION voucher_operator_guard_grant() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'discount grant % cannot be deleted: a grant ends (its redemption reversed), it does not vanish',
            OLD.grant_id
            USING ERRCODE = 'VG001', HINT = 'voucher-operator guard: discount grants';
    END IF;
    IF (NEW.grant_id, NEW.customer_id, NEW.code, NEW.percent_off, NEW.amount_off, NEW.applies_to,
        NEW.duration_months, NEW.currency, NEW.starts_at, NEW.ends_at, NEW.created_at)
       IS DISTINCT FROM
       (OLD.grant_id, OLD.customer_id, OLD.code, OLD.percent_off, OLD.amount_off, OLD.applies_to,
        OLD.duration_months, OLD.currency, OLD.starts_at, OLD.ends_at, OLD.created_at)
       OR (OLD.ended_at IS NOT NULL AND NEW.ended_at IS DISTINCT FROM OLD.ended_at) THEN
        RAISE EXCEPTION 'discount grant % holds the terms its customer redeemed: they cannot change (only ended_at, once)',
            OLD.grant_id
            USING ERRCODE = 'VG001', HINT = 'voucher-operator guard: discount grants';
    END IF;
    RETURN NEW;
END;
$$;

DROP TRIGGER IF EXISTS voucher_operator_grant_kept ON voucher_discount_grants;
CREATE TRIGGER voucher_operator_grant_kept
    BEFORE UPDATE OR DELETE ON voucher_discount_grants
    FOR EACH ROW EXECUTE FUNCTION voucher_operator_guard_grant();

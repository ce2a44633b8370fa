-- Once per customer on any Sovereign (`perCustomer: Global`, DESIGN §11 rule 8, docs/federation.md).
--
-- `per_customer_global`: the hub's definition says so; the controller keeps it with the binding.
ALTER TABLE voucher_global_allotments ADD COLUMN IF NOT EXISTS per_customer_global BOOLEAN NOT NULL DEFAULT false;

-- The local intents of such redemptions. A redemption writes one `pending`, asks the hub to claim
-- the customer for it, then — in one transaction that takes the intent's row lock — moves it to
-- `claimed`, redeems, and leaves it `done` (or `aborted` when nothing was granted). Recovery moves
-- a `pending` intent it finds too old to `aborted` under the same lock, so a slow redemption and a
-- recovery never both win, then asks the hub to delete the claim until it acknowledges. A reversal
-- moves `done` to `released` (the claim deleted the same way). `refused`: the hub said the customer
-- is held by another intent. The subject stays here; the hub knows only `claimant` (an HMAC).
CREATE TABLE IF NOT EXISTS voucher_global_claims (
    intent UUID PRIMARY KEY,
    code TEXT NOT NULL REFERENCES promo_codes (code),
    subject TEXT NOT NULL,
    claimant TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending'
        CHECK (state IN ('pending', 'claimed', 'done', 'refused', 'aborted', 'released')),
    -- For `aborted` and `released`: the hub acknowledged the claim's delete.
    acknowledged BOOLEAN NOT NULL DEFAULT false,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS voucher_global_claims_open
    ON voucher_global_claims (created_at)
    WHERE state = 'pending' OR (state IN ('aborted', 'released') AND NOT acknowledged);
CREATE INDEX IF NOT EXISTS voucher_global_claims_customer ON voucher_global_claims (code, subject);

-- The guard, for every writer: a redemption of such a code needs its intent `claimed` in the same
-- transaction — which only the operator's redemption writes, holding the hub's claim. The billing
-- service's own checkout (and psql) cannot redeem it: it would skip the hub, and the customer could
-- redeem again on another Sovereign.
CREATE OR REPLACE FUNCTION voucher_operator_guard_global_claim() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM voucher_global_allotments a
                WHERE a.code = NEW.code AND a.per_customer_global)
       AND NOT EXISTS (SELECT 1 FROM voucher_global_claims g
                         JOIN customers c ON c.user_id = g.subject
                        WHERE g.code = NEW.code AND c.id = NEW.customer_id AND g.state = 'claimed') THEN
        RAISE EXCEPTION 'voucher code % is once per customer on any Sovereign: only voucher-operator''s redemption, holding the hub''s claim for the customer, redeems it',
            NEW.code
            USING ERRCODE = 'VG001', HINT = 'voucher-operator guard: once per customer anywhere';
    END IF;
    RETURN NEW;
END;
$$;

DO $$
BEGIN
    EXECUTE format(
        'ALTER FUNCTION voucher_operator_guard_global_claim() SET search_path = %I, pg_catalog, pg_temp',
        current_schema());
END;
$$;

DROP TRIGGER IF EXISTS voucher_operator_guard_global_claim ON promo_redemptions;
CREATE TRIGGER voucher_operator_guard_global_claim
    BEFORE INSERT ON promo_redemptions
    FOR EACH ROW EXECUTE FUNCTION voucher_operator_guard_global_claim();

-- Cross-Sovereign vouchers on a Sovereign (DESIGN §11, docs/federation.md). One row per global
-- code, never deleted (rule 4: a re-created Voucher finds its share, version and high-water count):
-- `state` is voucher_core::allotment::Local, `local_cap` what it lets this database redeem (the
-- share once synced under this database's identity, 0 before). The billing row's max_redemptions
-- and active are derived from it in the same transaction, never from the spec, and the guard below
-- holds every writer to it (rule 9).
CREATE TABLE IF NOT EXISTS voucher_global_allotments (
    code TEXT PRIMARY KEY REFERENCES promo_codes (code),
    hub_uid TEXT NOT NULL,
    local_cap BIGINT NOT NULL DEFAULT 0 CHECK (local_cap >= 0),
    state JSONB NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Marks the billing row of a global code, so that the guard costs nothing on every other row's
-- update (a trigger's WHEN cannot look into another table). Set once, never unset: the guard
-- keeps it set whoever writes.
ALTER TABLE promo_codes ADD COLUMN IF NOT EXISTS global_allotment BOOLEAN NOT NULL DEFAULT false;

-- The guard for global rows, for every writer: the counter never passes the operator's share
-- (the legacy checkout's counter update is refused, so its whole transaction is), max_redemptions
-- and active follow the share whatever a writer sets (a share of 0 is an inactive row, never
-- max_redemptions = 0, which the legacy checkout reads as unlimited), and the mark stays.
CREATE OR REPLACE FUNCTION voucher_operator_guard_global_row() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    cap BIGINT;
BEGIN
    SELECT a.local_cap INTO cap FROM voucher_global_allotments a WHERE a.code = NEW.code;
    IF NOT FOUND THEN
        cap := 0; -- marked, and no allotment yet: nothing to redeem
    END IF;
    NEW.global_allotment := true;
    IF NEW.times_redeemed > cap AND NEW.times_redeemed > OLD.times_redeemed THEN
        RAISE EXCEPTION 'voucher code % is a global voucher: this Sovereign''s allotment of it (%) is used up',
            NEW.code, cap
            USING ERRCODE = 'VG001', HINT = 'voucher-operator guard: the global allotment';
    END IF;
    NEW.max_redemptions := GREATEST(cap, 1);
    IF cap = 0 THEN
        NEW.active := false;
    END IF;
    RETURN NEW;
END;
$$;

DO $$
BEGIN
    EXECUTE format(
        'ALTER FUNCTION voucher_operator_guard_global_row() SET search_path = %I, pg_catalog, pg_temp',
        current_schema());
END;
$$;

DROP TRIGGER IF EXISTS voucher_operator_guard_global_row ON promo_codes;
CREATE TRIGGER voucher_operator_guard_global_row
    BEFORE UPDATE ON promo_codes
    FOR EACH ROW WHEN (OLD.global_allotment OR NEW.global_allotment)
    EXECUTE FUNCTION voucher_operator_guard_global_row();

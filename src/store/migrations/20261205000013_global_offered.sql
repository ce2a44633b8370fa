-- Cross-Sovereign vouchers on a Sovereign, second part (DESIGN §11, docs/federation.md).
--
-- `offered`: whether this Sovereign offers the code now — its Voucher exists and the hub's terms
-- make it redeemable (active, in its window). The controller sets it; the leader's allotment loop
-- returns the unused share of a code not offered (rule 7: only the Sovereign lowers its share).
ALTER TABLE voucher_global_allotments ADD COLUMN IF NOT EXISTS offered BOOLEAN NOT NULL DEFAULT true;

-- `synced_identity`: the database identity (system identifier and timeline) the share was last
-- synced with the hub under. A restore from a backup or a failover changes the identity, and the
-- guard then counts the share as 0 — for every writer, at once, not only once the operator has
-- noticed — until the leader's sync with the hub (rule 5).
ALTER TABLE voucher_global_allotments ADD COLUMN IF NOT EXISTS synced_identity TEXT;

CREATE OR REPLACE FUNCTION voucher_operator_database_identity() RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER AS $$
    SELECT s.system_identifier::text || ':' || c.timeline_id::text
      FROM pg_control_system() s, pg_control_checkpoint() c
$$;

CREATE OR REPLACE FUNCTION voucher_operator_guard_global_row() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    cap BIGINT;
BEGIN
    SELECT CASE WHEN a.synced_identity = voucher_operator_database_identity() THEN a.local_cap ELSE 0 END
      INTO cap FROM voucher_global_allotments a WHERE a.code = NEW.code;
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
        'ALTER FUNCTION voucher_operator_database_identity() SET search_path = %I, pg_catalog, pg_temp',
        current_schema());
    EXECUTE format(
        'ALTER FUNCTION voucher_operator_guard_global_row() SET search_path = %I, pg_catalog, pg_temp',
        current_schema());
END;
$$;

-- What a global code's answers and its Voucher's status read from its allotment (the share, the
-- hub's "every unit spent", the cap here, whether it is offered) is a change of the code: said on
-- the channel every other change of a code is said on, so that the server's cached reads and the
-- controller follow it (the billing row itself is written only when its cap or switch moves).
CREATE OR REPLACE FUNCTION voucher_operator_notify_allotment() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('voucher_operator_codes', NEW.code);
    RETURN NULL;
END;
$$;

DO $$
BEGIN
    EXECUTE format(
        'ALTER FUNCTION voucher_operator_notify_allotment() SET search_path = %I, pg_catalog, pg_temp',
        current_schema());
END;
$$;

DROP TRIGGER IF EXISTS voucher_operator_notify_allotment ON voucher_global_allotments;
CREATE TRIGGER voucher_operator_notify_allotment
    AFTER UPDATE ON voucher_global_allotments
    FOR EACH ROW WHEN (
        OLD.state->'share' IS DISTINCT FROM NEW.state->'share'
        OR OLD.state->'gone' IS DISTINCT FROM NEW.state->'gone'
        OR OLD.local_cap IS DISTINCT FROM NEW.local_cap
        OR OLD.offered IS DISTINCT FROM NEW.offered)
    EXECUTE FUNCTION voucher_operator_notify_allotment();

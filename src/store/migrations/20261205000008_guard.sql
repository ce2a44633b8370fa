-- The guard (DESIGN §13): the rules the operator promises about money hold for every writer of
-- the billing database — the billing service's own checkout, its admin page, psql — not only for
-- the operator's server. A trigger on promo_redemptions refuses a redemption:
--   * outside the code's window (valid_from / expires_at, which the legacy checkout ignores);
--   * of a code whose VoucherCampaign is switched off (one row: voucher_campaigns.active), whatever
--     the code's own row says (the admin page may have flipped it back on);
--   * of a suspended code, or a code of a suspended campaign (voucher_suspensions).
-- It decides with primary-key probes only (the code's row, its campaign, its suspensions), so a
-- campaign of a million codes switches off in one row, at once, on every path.
--
-- SECURITY DEFINER (owned by the migration's role, the schema owner): any writer passes through
-- it without grants on the operator's tables, and only the owner may disable or drop it (a
-- runtime role cannot; a superuser can, with session_replication_role — documented as such).
-- The later rules (discount grants, global allotments, claims) add one probe each here.

-- The campaign's switch in one row, kept by the controller with its terms.
ALTER TABLE voucher_campaigns ADD COLUMN IF NOT EXISTS active BOOLEAN NOT NULL DEFAULT true;
UPDATE voucher_campaigns SET active = COALESCE((terms->>'active')::boolean, true)
 WHERE terms IS NOT NULL AND active IS DISTINCT FROM COALESCE((terms->>'active')::boolean, true);

-- Suspensions that GitOps cannot revert: of a code (target = the code) or of a campaign
-- (target = 'campaign:' || its uid), by the admin endpoint or by the resource's annotation. Each
-- source lifts its own.
CREATE TABLE IF NOT EXISTS voucher_suspensions (
    target TEXT NOT NULL,
    source TEXT NOT NULL CHECK (source IN ('admin', 'annotation')),
    actor TEXT NOT NULL,
    suspended_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (target, source)
);

CREATE OR REPLACE FUNCTION voucher_operator_guard_redemption() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    seen RECORD;
BEGIN
    SELECT p.valid_from, p.expires_at, c.uid AS campaign_uid, c.namespace, c.name, c.active,
           EXISTS (SELECT 1 FROM voucher_suspensions s
                    WHERE s.target = p.code OR s.target = 'campaign:' || c.uid) AS suspended
      INTO seen
      FROM promo_codes p
      LEFT JOIN voucher_campaign_codes cc ON cc.code = p.code
      -- A released (deleted) campaign no longer decides for its codes (Orphan leaves them live).
      LEFT JOIN voucher_campaigns c ON c.uid = cc.campaign_uid AND c.released_at IS NULL
     WHERE p.code = NEW.code;
    IF NOT FOUND THEN
        RETURN NEW; -- the foreign key refuses it
    END IF;
    IF seen.valid_from IS NOT NULL AND now() < seen.valid_from THEN
        RAISE EXCEPTION 'voucher code % cannot be redeemed before % (its validFrom)',
            NEW.code, seen.valid_from
            USING ERRCODE = 'VG001', HINT = 'voucher-operator guard: the redemption window';
    END IF;
    IF seen.expires_at IS NOT NULL AND now() >= seen.expires_at THEN
        RAISE EXCEPTION 'voucher code % expired at % (its expiresAt)', NEW.code, seen.expires_at
            USING ERRCODE = 'VG001', HINT = 'voucher-operator guard: the redemption window';
    END IF;
    IF seen.campaign_uid IS NOT NULL AND NOT seen.active THEN
        RAISE EXCEPTION 'voucher code % belongs to VoucherCampaign %/%, which is switched off',
            NEW.code, seen.namespace, seen.name
            USING ERRCODE = 'VG001', HINT = 'voucher-operator guard: the campaign switch';
    END IF;
    IF seen.suspended THEN
        RAISE EXCEPTION 'voucher code % is suspended', NEW.code
            USING ERRCODE = 'VG001', HINT = 'voucher-operator guard: suspension';
    END IF;
    RETURN NEW;
END;
$$;

-- A SECURITY DEFINER function must not let its caller choose what its names mean: the schema
-- the migration ran in, then pg_temp last (searched first otherwise, a temporary table of the
-- caller's named voucher_suspensions or promo_codes would stand in for the real one).
DO $$
BEGIN
    EXECUTE format(
        'ALTER FUNCTION voucher_operator_guard_redemption() SET search_path = %I, pg_catalog, pg_temp',
        current_schema());
END;
$$;

DROP TRIGGER IF EXISTS voucher_operator_guard ON promo_redemptions;
CREATE TRIGGER voucher_operator_guard
    BEFORE INSERT ON promo_redemptions
    FOR EACH ROW EXECUTE FUNCTION voucher_operator_guard_redemption();

-- A campaign switched, or a code or campaign suspended: the previews' memory forgets, and the
-- owner's reconcile wakes (the code for a code; 'campaign:' || its uid for a campaign).
CREATE OR REPLACE FUNCTION voucher_operator_notify_switch() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('voucher_operator_codes', COALESCE(NEW.target, OLD.target));
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS voucher_operator_suspension_changed ON voucher_suspensions;
CREATE TRIGGER voucher_operator_suspension_changed
    AFTER INSERT OR UPDATE OR DELETE ON voucher_suspensions
    FOR EACH ROW EXECUTE FUNCTION voucher_operator_notify_switch();

CREATE OR REPLACE FUNCTION voucher_operator_notify_campaign_switch() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.active IS DISTINCT FROM OLD.active THEN
        PERFORM pg_notify('voucher_operator_codes', 'campaign:' || NEW.uid);
    END IF;
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS voucher_operator_campaign_switched ON voucher_campaigns;
CREATE TRIGGER voucher_operator_campaign_switched
    AFTER UPDATE ON voucher_campaigns
    FOR EACH ROW EXECUTE FUNCTION voucher_operator_notify_campaign_switch();

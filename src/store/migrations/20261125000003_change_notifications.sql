-- The phase the operator last recorded for a bound code, so that clock-driven
-- audit records (expired) are written exactly once.
ALTER TABLE voucher_bindings ADD COLUMN IF NOT EXISTS phase TEXT NULL;

-- Every change of a promo_codes row, by the operator, the billing service or
-- the admin page, notifies the controller so that status follows within
-- seconds and out-of-band edits are reverted. Adds a trigger; changes no
-- column or row of the billing tables.
CREATE OR REPLACE FUNCTION voucher_operator_notify_code() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('voucher_operator_codes', COALESCE(NEW.code, OLD.code));
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

DROP TRIGGER IF EXISTS voucher_operator_code_changed ON promo_codes;
CREATE TRIGGER voucher_operator_code_changed
    AFTER INSERT OR UPDATE OR DELETE ON promo_codes
    FOR EACH ROW EXECUTE FUNCTION voucher_operator_notify_code();

-- New outbox records wake the audit relay.
CREATE OR REPLACE FUNCTION voucher_operator_notify_outbox() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('voucher_operator_outbox', '');
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

DROP TRIGGER IF EXISTS voucher_operator_outbox_appended ON voucher_audit_outbox;
CREATE TRIGGER voucher_operator_outbox_appended
    AFTER INSERT ON voucher_audit_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION voucher_operator_notify_outbox();

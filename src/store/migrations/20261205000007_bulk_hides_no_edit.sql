-- A campaign's bulk statements set voucher_operator.bulk so that thousands of rows notify as
-- one '*' rather than one notification each. Any session can set that variable, though: as the
-- previous trigger read it, the billing service, its admin page or psql could hide an edit of a
-- Voucher's row from drift correction until the next resync. Now only a campaign's own codes go
-- unnamed, and they still announce themselves with '*' (Postgres delivers one per transaction):
-- every other row is named whatever the session says.
--
-- Deferred to the commit, so that a code inserted in the same transaction as its
-- voucher_campaign_codes row (a generation chunk) is already known as a campaign's.
CREATE OR REPLACE FUNCTION voucher_operator_notify_code() RETURNS trigger AS $$
DECLARE
    changed TEXT := COALESCE(NEW.code, OLD.code);
BEGIN
    -- Nested, not AND: the probe (and the right to read the operator's table it needs) only
    -- for a session that says bulk; the billing service's own writes never run it.
    IF current_setting('voucher_operator.bulk', true) = 'on' THEN
        IF EXISTS (SELECT 1 FROM voucher_campaign_codes WHERE code = changed) THEN
            PERFORM pg_notify('voucher_operator_codes', '*');
            RETURN NULL;
        END IF;
    END IF;
    PERFORM pg_notify('voucher_operator_codes', changed);
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

DROP TRIGGER IF EXISTS voucher_operator_code_changed ON promo_codes;
CREATE CONSTRAINT TRIGGER voucher_operator_code_changed
    AFTER INSERT OR UPDATE OR DELETE ON promo_codes
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION voucher_operator_notify_code();

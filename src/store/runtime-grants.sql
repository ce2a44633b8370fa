-- What voucher-operator's runtime (controller, server, run) needs of the billing
-- database: rows read and written, no schema changed. Run as the schema's owner after
-- `voucher-operator migrate` (which needs the owner's credentials), for a role of yours:
--   CREATE ROLE voucher_runtime LOGIN PASSWORD '…';
GRANT SELECT, INSERT, UPDATE ON promo_codes TO voucher_runtime;
GRANT SELECT, INSERT ON customers, promo_redemptions, credit_ledger TO voucher_runtime;
GRANT SELECT, INSERT, UPDATE, DELETE ON voucher_bindings, voucher_audit_outbox, voucher_idempotency_keys TO voucher_runtime;
GRANT SELECT, INSERT ON voucher_audit_dead_letters TO voucher_runtime;
GRANT USAGE ON SEQUENCE voucher_audit_outbox_seq_seq TO voucher_runtime;
GRANT SELECT ON voucher_operator_migrations TO voucher_runtime;
GRANT SELECT, INSERT, UPDATE, DELETE ON voucher_campaigns, voucher_campaign_codes TO voucher_runtime;
GRANT SELECT, INSERT, DELETE ON voucher_suspensions TO voucher_runtime;
GRANT SELECT, INSERT ON voucher_discount_grants TO voucher_runtime;
GRANT UPDATE (consumed_by) ON voucher_discount_grants TO voucher_runtime;
GRANT SELECT, INSERT, UPDATE ON voucher_checkout_orders TO voucher_runtime;
GRANT SELECT, INSERT ON voucher_checkout_uses TO voucher_runtime;
GRANT UPDATE (ended_at) ON voucher_discount_grants TO voucher_runtime;
GRANT DELETE ON promo_redemptions TO voucher_runtime;
GRANT SELECT, INSERT ON voucher_redemption_history TO voucher_runtime;
GRANT SELECT, INSERT, UPDATE ON voucher_global_allotments TO voucher_runtime;
GRANT SELECT, INSERT ON voucher_database_incarnation TO voucher_runtime;
GRANT SELECT, INSERT, UPDATE ON voucher_global_claims TO voucher_runtime;
GRANT SELECT, INSERT, UPDATE, DELETE ON voucher_orphan_releases TO voucher_runtime;

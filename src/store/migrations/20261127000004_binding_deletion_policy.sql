-- The deletion policy of the Voucher a code is bound to, recorded at each bind,
-- so that it is applied even when the Voucher vanished without its finalizer
-- (removed by hand): the periodic sweep releases such bindings with it.
ALTER TABLE voucher_bindings ADD COLUMN IF NOT EXISTS deletion_policy TEXT NOT NULL DEFAULT 'Revoke';

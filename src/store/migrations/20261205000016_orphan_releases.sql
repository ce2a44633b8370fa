-- Codes a Voucher let go of with deletionPolicy Orphan (the row kept, redeemable, owned by
-- nobody): `export` writes them back with Orphan, as their last owner chose, instead of the
-- default Revoke. Written in the release's transaction; gone when the code is bound again or
-- revoked (the new owner's policy, or the revocation, is what holds then); a release forced to
-- Orphan (the CRD being deleted, a global copy) records nothing, the owner did not choose it. Not
-- the audit outbox: that is pruned after its retention. A row the billing service deletes takes
-- its record with it.
CREATE TABLE IF NOT EXISTS voucher_orphan_releases (
    code TEXT PRIMARY KEY REFERENCES promo_codes (code) ON DELETE CASCADE,
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    released_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

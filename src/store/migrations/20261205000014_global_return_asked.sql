-- Cross-Sovereign vouchers on a Sovereign, third part (DESIGN §11 rule 7, docs/federation.md):
-- the hub asks for returns when the vendor lowered the cap below the units granted. The
-- controller reads that from the hub's record and sets `return_asked`; the leader's allotment
-- loop then gives back what is unspent here (only the Sovereign lowers its own share) and asks
-- for nothing more until the hub's units fit the cap again.
ALTER TABLE voucher_global_allotments ADD COLUMN IF NOT EXISTS return_asked BOOLEAN NOT NULL DEFAULT false;

-- Cross-Sovereign vouchers on a Sovereign, third part (DESIGN §11 rule 7, docs/federation.md):
-- the hub asks for returns when the vendor lowered the cap below the units granted. The
-- controller reads that from the hub's record and sets `return_asked`; the leader's allotment
-- loop then gives back what is unspent here (only the Sovereign lowers its own share) and asks
-- for nothing more until the hub's units fit the cap again.
ALTER TABLE voucher_global_allotments ADD COLUMN IF NOT EXISTS return_asked BOOLEAN NOT NULL DEFAULT false;

-- The database's incarnation: a token in an UNLOGGED table, which no physical backup carries and
-- crash recovery empties. The system identifier changes with a logical restore into a new
-- cluster and the timeline with a point-in-time recovery, but a base backup copied back and
-- started as it is keeps both: without the token, such a restore from before a return would serve
-- the returned units again (rule 5). The leader writes a new token when it finds none (and then
-- syncs with the hub); until then the guard counts no share. After a crash of Postgres the same
-- happens once: a sync, at most one allotment round later.
CREATE UNLOGGED TABLE IF NOT EXISTS voucher_database_incarnation (
    only_row BOOLEAN PRIMARY KEY DEFAULT true CHECK (only_row),
    token TEXT NOT NULL
);

CREATE OR REPLACE FUNCTION voucher_operator_database_identity() RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER AS $$
    SELECT s.system_identifier::text || ':' || c.timeline_id::text || ':'
           || COALESCE((SELECT i.token FROM voucher_database_incarnation i), 'none')
      FROM pg_control_system() s, pg_control_checkpoint() c
$$;

DO $$
BEGIN
    EXECUTE format(
        'ALTER FUNCTION voucher_operator_database_identity() SET search_path = %I, pg_catalog, pg_temp',
        current_schema());
END;
$$;

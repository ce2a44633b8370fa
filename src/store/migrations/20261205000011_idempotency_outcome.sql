-- What a redemption decided, recorded for its Idempotency-Key: the outcome itself (granted with
-- its grant, a repeat with the original grant, refused and why), from which the server renders
-- the first answer and every replay alike; the store renders nothing. Rows answered by earlier
-- versions hold the rendered answer in status and response instead, and are replayed as they are
-- until the retention prunes them.
ALTER TABLE voucher_idempotency_keys ADD COLUMN IF NOT EXISTS outcome JSONB NULL;

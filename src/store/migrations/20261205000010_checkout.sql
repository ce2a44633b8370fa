-- The checkout (DESIGN §10): an order committed once per customer and order id, with the
-- discount each grant took off its lines; a reversal gives it back.

-- The order that consumed a once-grant (a grant with no duration is used by one order only);
-- NULL again when that order is reversed. The guard lets it change (a grant's terms, never).
ALTER TABLE voucher_discount_grants ADD COLUMN IF NOT EXISTS consumed_by TEXT NULL;

CREATE TABLE IF NOT EXISTS voucher_checkout_orders (
    customer_id UUID NOT NULL REFERENCES customers(id),
    order_id TEXT NOT NULL CHECK (length(order_id) BETWEEN 1 AND 128),
    -- The body as committed, in canonical form (lines sorted by id): a repeat must equal it.
    request JSONB NOT NULL,
    -- What the commit answered, replayed to a repeat.
    answer JSONB NOT NULL,
    committed_by TEXT NOT NULL,
    committed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    reversed_at TIMESTAMPTZ NULL,
    -- What the reversal answered, replayed to a repeat.
    reversal JSONB NULL,
    PRIMARY KEY (customer_id, order_id)
);

-- What each grant took off each line of an order. Written by the statement that records its
-- order, never alone: no foreign key to the order (its check, a plan cached while the orders
-- table was small, scanned the whole table three times a commit: 0.17 ms and 195 buffers).
CREATE TABLE IF NOT EXISTS voucher_checkout_uses (
    customer_id UUID NOT NULL,
    order_id TEXT NOT NULL,
    line_id TEXT NOT NULL,
    grant_id UUID NOT NULL REFERENCES voucher_discount_grants(grant_id),
    amount BIGINT NOT NULL CHECK (amount > 0),
    PRIMARY KEY (customer_id, order_id, line_id)
);
CREATE INDEX IF NOT EXISTS voucher_checkout_uses_grant ON voucher_checkout_uses (grant_id);

-- Reversed redemptions (Voucherify's rollback): the row leaves promo_redemptions, so the slot is
-- free and the customer may redeem again; here it stays, with why and by whom. A credit was
-- clawed back by a compensating ledger entry (promo-reversal:<CODE>), a discount grant ended.
CREATE TABLE IF NOT EXISTS voucher_redemption_history (
    customer_id UUID NOT NULL REFERENCES customers(id),
    code TEXT NOT NULL REFERENCES promo_codes(code),
    redeemed_at TIMESTAMPTZ NOT NULL,
    reversed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    reversed_by TEXT NOT NULL,
    reason TEXT NOT NULL,
    -- What was given back: the credit clawed back, or the discount grant ended.
    credit_omr INT NULL,
    grant_id UUID NULL REFERENCES voucher_discount_grants(grant_id),
    PRIMARY KEY (customer_id, code, redeemed_at)
);

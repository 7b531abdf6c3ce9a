-- Money saved, at the price table's prices: `saved_nanodollars` in 10^-9 USD (integer sums,
-- exact), and `saved_unpriced` counting answers that saved tokens of a model with no price.
ALTER TABLE counters ADD COLUMN saved_nanodollars INTEGER NOT NULL DEFAULT 0;
ALTER TABLE counters ADD COLUMN saved_unpriced    INTEGER NOT NULL DEFAULT 0;

-- The provider's own prompt cache, as its answers to the upstream calls made report it (beside,
-- not mixed with, what llm-dedup's cache saved): prompt tokens it read from its cache and wrote
-- to it, what that saved against the plain input price in nanodollars (a write costs more
-- than plain input, so this may be below zero), and the calls held while another request
-- wrote a prefix they share, with the milliseconds they waited.
ALTER TABLE counters ADD COLUMN provider_cache_read_tokens      INTEGER NOT NULL DEFAULT 0;
ALTER TABLE counters ADD COLUMN provider_cache_write_tokens     INTEGER NOT NULL DEFAULT 0;
ALTER TABLE counters ADD COLUMN provider_cache_saved_nanodollars INTEGER NOT NULL DEFAULT 0;
ALTER TABLE counters ADD COLUMN prefix_holds                    INTEGER NOT NULL DEFAULT 0;
ALTER TABLE counters ADD COLUMN prefix_held_ms                  INTEGER NOT NULL DEFAULT 0;

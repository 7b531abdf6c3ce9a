-- Embeddings are cached per input, so one request can be answered partly from the cache.
-- `partials` counts such requests; `inputs` and `inputs_saved` count embedding inputs received
-- and those that did not go upstream (cached, shared with a request in flight, or repeated
-- within the request).
ALTER TABLE counters ADD COLUMN partials     INTEGER NOT NULL DEFAULT 0;
ALTER TABLE counters ADD COLUMN inputs       INTEGER NOT NULL DEFAULT 0;
ALTER TABLE counters ADD COLUMN inputs_saved INTEGER NOT NULL DEFAULT 0;

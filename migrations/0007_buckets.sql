-- Buckets: several answers kept under one key for sampled requests. The first answer of a key
-- is its ordinary row; each other answer has a row of its own, under a key derived from the
-- bucket's, naming the bucket's key and its place (1 to 19). A purge of a key removes them all.
ALTER TABLE entries ADD COLUMN bucket_of   TEXT;                        -- 64 hex characters
ALTER TABLE entries ADD COLUMN bucket_slot INTEGER NOT NULL DEFAULT 0;

CREATE INDEX entries_bucket_of ON entries (bucket_of) WHERE bucket_of IS NOT NULL;

-- Purges made by `llm-dedup purge`, each with what it selected, so that a serving proxy's
-- writer never writes back an answer it had queued before the purge (it drops a queued answer
-- that a purge made after the answer would have removed). Kept a day.
CREATE TABLE purges (
    at             INTEGER NOT NULL,  -- when, in Unix milliseconds
    key            TEXT,              -- only this key
    model          TEXT,              -- only this model
    route          TEXT,              -- only this route
    created_before INTEGER,           -- only answers stored before this time (Unix ms)
    expired_by     INTEGER            -- only answers expired at this time (Unix ms)
);
CREATE INDEX purges_at ON purges (at);

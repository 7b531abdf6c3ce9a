-- Stored answers. One row per cache key; no request header (and so no credential) is kept.
CREATE TABLE entries (
    key               TEXT PRIMARY KEY NOT NULL,  -- 64 lowercase hex characters
    namespace         TEXT    NOT NULL,
    route             TEXT    NOT NULL,           -- route name, e.g. 'chat.completions'
    model             TEXT,
    status            INTEGER NOT NULL,
    headers           TEXT    NOT NULL,           -- JSON array of [name, value] worth replaying
    body              BLOB    NOT NULL,           -- decoded response body
    created_at        INTEGER NOT NULL,           -- Unix milliseconds
    expires_at        INTEGER NOT NULL,           -- Unix milliseconds
    last_hit_at       INTEGER,                    -- Unix milliseconds, NULL until the first hit
    hit_count         INTEGER NOT NULL DEFAULT 0,
    prompt_tokens     INTEGER,
    completion_tokens INTEGER,
    total_tokens      INTEGER,
    size              INTEGER NOT NULL            -- bytes counted against the size bound
) WITHOUT ROWID;

CREATE INDEX entries_expires_at ON entries (expires_at);
CREATE INDEX entries_last_used ON entries (coalesce(last_hit_at, created_at));

-- Small facts about the database itself: the credential-fingerprint salt, creation time.
CREATE TABLE meta (
    name  TEXT PRIMARY KEY NOT NULL,
    value BLOB NOT NULL
) WITHOUT ROWID;

-- What the cache did, since the database was created: one row per route and model, updated
-- by the proxy in the writer's batches. `model` is '' when the request named none.
CREATE TABLE counters (
    route                   TEXT    NOT NULL,
    model                   TEXT    NOT NULL DEFAULT '',
    requests                INTEGER NOT NULL DEFAULT 0,
    hits                    INTEGER NOT NULL DEFAULT 0,
    coalesced               INTEGER NOT NULL DEFAULT 0,
    misses                  INTEGER NOT NULL DEFAULT 0,
    bypasses                INTEGER NOT NULL DEFAULT 0,
    upstream_calls          INTEGER NOT NULL DEFAULT 0,
    upstream_429s           INTEGER NOT NULL DEFAULT 0,
    saved_prompt_tokens     INTEGER NOT NULL DEFAULT 0,
    saved_completion_tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (route, model)
) WITHOUT ROWID;

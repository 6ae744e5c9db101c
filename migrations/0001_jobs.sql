-- Training jobs and their checkpoints. Portable SQL (SQLite now, Postgres later):
-- timestamps are UTC milliseconds since the Unix epoch, ids are UUID strings.

CREATE TABLE jobs (
    id                  TEXT PRIMARY KEY,
    state               TEXT NOT NULL,
    preset              TEXT NOT NULL,
    config_json         TEXT NOT NULL,
    dataset_format      TEXT NOT NULL,
    dataset_path        TEXT NOT NULL,
    created_at_ms       BIGINT NOT NULL,
    started_at_ms       BIGINT,
    finished_at_ms      BIGINT,
    epochs_completed    INTEGER NOT NULL DEFAULT 0,
    epochs_total        INTEGER NOT NULL,
    latest_metrics_json TEXT,
    best_checkpoint_id  TEXT,
    test_accuracy       DOUBLE PRECISION,
    error               TEXT NOT NULL DEFAULT '',
    restarts            INTEGER NOT NULL DEFAULT 0,
    cancel_requested    BOOLEAN NOT NULL DEFAULT FALSE
);

CREATE INDEX jobs_by_state ON jobs (state, created_at_ms);
CREATE INDEX jobs_by_created ON jobs (created_at_ms, id);

CREATE TABLE checkpoints (
    id             TEXT PRIMARY KEY,
    job_id         TEXT NOT NULL REFERENCES jobs (id),
    epoch          INTEGER NOT NULL,
    val_accuracy   DOUBLE PRECISION,
    path           TEXT NOT NULL,
    is_best        BOOLEAN NOT NULL DEFAULT FALSE,
    created_at_ms  BIGINT NOT NULL,
    UNIQUE (job_id, epoch)
);

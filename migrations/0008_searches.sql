-- Hyper-parameter searches. A search's trials are jobs (`search_id`, `trial`: its number,
-- unique in the search, so no trial is started twice); `rung` is the ASHA rung a trial
-- trains towards and `pause_at` the epoch it waits at for a promotion (NULL: it trains to
-- the end). Whoever advances a search (any replica) does so in one transaction that first
-- raises the search's `version` (locking its row), records the trials' reports at their
-- rungs, promotes, starts and stops trials, and appends what it did to `search_events`.
CREATE TABLE searches (
    id                TEXT PRIMARY KEY,
    state             TEXT NOT NULL,
    preset            TEXT NOT NULL,
    spec_json         TEXT NOT NULL,
    base_config_json  TEXT NOT NULL,
    dataset_format    TEXT NOT NULL,
    dataset_path      TEXT NOT NULL,
    created_by        TEXT NOT NULL DEFAULT '',
    created_at_ms     BIGINT NOT NULL,
    finished_at_ms    BIGINT,
    version           BIGINT NOT NULL DEFAULT 0,
    best_job_id       TEXT,
    best_trial        BIGINT,
    best_rung         BIGINT,
    best_metric       DOUBLE PRECISION,
    error             TEXT NOT NULL DEFAULT ''
);

CREATE INDEX searches_by_created ON searches (created_at_ms, id);
CREATE INDEX searches_by_state ON searches (state);

ALTER TABLE jobs ADD COLUMN search_id TEXT;
ALTER TABLE jobs ADD COLUMN trial BIGINT;
ALTER TABLE jobs ADD COLUMN rung BIGINT NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN pause_at BIGINT;
CREATE UNIQUE INDEX jobs_by_trial ON jobs (search_id, trial);

-- A trial's figure at each rung it reached (the rung's last epoch's validation metric).
CREATE TABLE search_reports (
    search_id      TEXT NOT NULL,
    trial          BIGINT NOT NULL,
    rung           BIGINT NOT NULL,
    epoch          BIGINT NOT NULL,
    metric         DOUBLE PRECISION,
    job_id         TEXT NOT NULL,
    created_at_ms  BIGINT NOT NULL,
    PRIMARY KEY (search_id, trial, rung)
);

-- What happened in a search, numbered from 1 (WatchSearch streams it).
CREATE TABLE search_events (
    search_id      TEXT NOT NULL,
    seq            BIGINT NOT NULL,
    kind           TEXT NOT NULL,
    trial          BIGINT,
    rung           BIGINT,
    epoch          BIGINT,
    metric         DOUBLE PRECISION,
    job_id         TEXT,
    message        TEXT NOT NULL DEFAULT '',
    created_at_ms  BIGINT NOT NULL,
    PRIMARY KEY (search_id, seq)
);

-- Every epoch's metrics of every job, as recorded (fenced) with the job's latest: a search's
-- trials' curves, from any replica. An epoch trained again after a crash replaces its row.
CREATE TABLE job_epochs (
    job_id        TEXT NOT NULL,
    epoch         BIGINT NOT NULL,
    metrics_json  TEXT NOT NULL,
    PRIMARY KEY (job_id, epoch)
);

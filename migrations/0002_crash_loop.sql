-- Crash-loop breaker: `run_open` is TRUE while a server runs the job (set when it starts it,
-- cleared when it stops it cleanly or the job ends), so finding it TRUE when a job is picked up
-- means the last server died running it; `unclean_exits` counts those deaths since the job
-- last saved a checkpoint.
ALTER TABLE jobs ADD COLUMN unclean_exits INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN run_open BOOLEAN NOT NULL DEFAULT FALSE;

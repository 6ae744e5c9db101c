-- Replicas sharing one job store. A worker claims a job by raising `attempt` (its fencing
-- token: every write a run makes is conditional on the attempt it was claimed with) and holds
-- it under a lease that ends at `lease_expires_at_ms` (the database's clock; NULL: released),
-- renewed while it runs. `worker` and `device` name the replica and device of the newest
-- attempt. `resume_path` is the newest checkpoint file the job committed (a run resumes from
-- it), `progress_json` the running job's latest step, for watchers on other replicas.
ALTER TABLE jobs ADD COLUMN attempt INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN worker TEXT NOT NULL DEFAULT '';
ALTER TABLE jobs ADD COLUMN device TEXT NOT NULL DEFAULT '';
ALTER TABLE jobs ADD COLUMN lease_expires_at_ms BIGINT;
ALTER TABLE jobs ADD COLUMN resume_path TEXT;
ALTER TABLE jobs ADD COLUMN progress_json TEXT;
-- The best checkpoint's copy (`best.aN.ckpt`), read when its epoch file was pruned.
ALTER TABLE checkpoints ADD COLUMN copy_path TEXT;

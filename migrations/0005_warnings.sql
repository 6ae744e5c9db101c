-- What a job's owner should know that did not stop it (a checkpoint skipped for an older
-- one, a restart from scratch): a JSON array of strings, the newest last, that GetJob shows.
ALTER TABLE jobs ADD COLUMN warnings_json TEXT;

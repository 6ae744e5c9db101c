-- Who started a job: the NAME of the bearer token (empty when the server checks no tokens).
ALTER TABLE jobs ADD COLUMN created_by TEXT NOT NULL DEFAULT '';

-- The class names of a job's model (a JSON array of strings), in the store every replica
-- reads: written when the job's run starts (from its dataset) or by ImportModel. NULL for
-- jobs from before it existed: their run directory's labels.json is read instead.
ALTER TABLE jobs ADD COLUMN labels_json TEXT;

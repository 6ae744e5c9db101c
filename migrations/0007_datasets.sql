-- Uploaded datasets. `name` is the handle clients use; `sha256` the archive's digest, which
-- names the extracted tree under <data-dir>/uploads/<sha256>/ (the same bytes uploaded twice
-- are stored once). `root` is the dataset's folder inside that tree, `info_json` what
-- GetDataset shows (classes, images per class, skipped files with reasons).
CREATE TABLE datasets (
    name             TEXT PRIMARY KEY,
    sha256           TEXT NOT NULL,
    format           TEXT NOT NULL,
    root             TEXT NOT NULL,
    archive_bytes    BIGINT NOT NULL,
    extracted_bytes  BIGINT NOT NULL,
    info_json        TEXT NOT NULL,
    created_by       TEXT NOT NULL,
    created_at_ms    BIGINT NOT NULL
);

CREATE INDEX datasets_by_sha256 ON datasets (sha256);
CREATE INDEX datasets_by_owner ON datasets (created_by);

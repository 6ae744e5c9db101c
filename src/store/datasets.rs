//! Rows of uploaded datasets: a name per upload, the archive's digest naming the stored tree.

use anyhow::Result;
use sqlx::any::AnyRow;
use sqlx::Row;

use super::{readable, Store, StoreResult};

/// One uploaded dataset.
#[derive(Clone, Debug, PartialEq)]
pub struct DatasetRow {
    pub name: String,
    pub sha256: String,
    /// `image-folder`, `cifar10` or `cifar100`.
    pub format: String,
    /// The dataset's folder inside the extracted tree (`""`: the tree itself).
    pub root: String,
    pub archive_bytes: u64,
    pub extracted_bytes: u64,
    /// Classes, images per class and skipped files, as GetDataset shows them (JSON).
    pub info_json: String,
    pub created_by: String,
    pub created_at_ms: i64,
}

const COLUMNS: &str = "name, sha256, format, root, archive_bytes, extracted_bytes, info_json, \
    created_by, created_at_ms";

impl DatasetRow {
    fn from_row(r: &AnyRow) -> Result<Self> {
        Ok(Self {
            name: r.try_get("name")?,
            sha256: r.try_get("sha256")?,
            format: r.try_get("format")?,
            root: r.try_get("root")?,
            archive_bytes: r.try_get::<i64, _>("archive_bytes")? as u64,
            extracted_bytes: r.try_get::<i64, _>("extracted_bytes")? as u64,
            info_json: r.try_get("info_json")?,
            created_by: r.try_get("created_by")?,
            created_at_ms: r.try_get("created_at_ms")?,
        })
    }
}

impl Store {
    /// Adds a dataset; false when its name is taken (nothing is written then).
    pub async fn insert_dataset(&self, d: &DatasetRow) -> StoreResult<bool> {
        self.write(async |c| {
            // A write first (no read before it in the transaction): SQLite then waits for the
            // write lock instead of failing to upgrade a read lock ("database is locked").
            let done = sqlx::query(&format!(
                "INSERT INTO datasets ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
                 ON CONFLICT (name) DO NOTHING"
            ))
            .bind(&d.name)
            .bind(&d.sha256)
            .bind(&d.format)
            .bind(&d.root)
            .bind(d.archive_bytes as i64)
            .bind(d.extracted_bytes as i64)
            .bind(&d.info_json)
            .bind(&d.created_by)
            .bind(d.created_at_ms)
            .execute(&mut *c)
            .await?;
            Ok(done.rows_affected() == 1)
        })
        .await
    }

    pub async fn get_dataset(&self, name: &str) -> StoreResult<Option<DatasetRow>> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM datasets WHERE name = $1"))
            .bind(name)
            .fetch_optional(self.pool()?)
            .await?;
        Ok(row.map(|r| DatasetRow::from_row(&r)).transpose()?)
    }

    /// Every dataset, by name.
    pub async fn list_datasets(&self) -> StoreResult<Vec<DatasetRow>> {
        let rows = sqlx::query(&format!("SELECT {COLUMNS} FROM datasets ORDER BY name"))
            .fetch_all(self.pool()?)
            .await?;
        Ok(readable(&rows, DatasetRow::from_row))
    }

    /// Archive bytes of the datasets `owner` uploaded (its quota's use).
    pub async fn dataset_bytes_of(&self, owner: &str) -> StoreResult<u64> {
        let row = sqlx::query(
            "SELECT CAST(COALESCE(SUM(archive_bytes), 0) AS BIGINT) AS n FROM datasets \
             WHERE created_by = $1",
        )
        .bind(owner)
        .fetch_one(self.pool()?)
        .await?;
        Ok(row.try_get::<i64, _>("n")? as u64)
    }

    /// Deletes a dataset unless a queued or running job reads it (`path` is the jobs'
    /// `dataset_path` for it). Returns the jobs in the way (nothing is deleted then), and
    /// whether other names still share its stored tree.
    pub async fn delete_dataset(
        &self,
        d: &DatasetRow,
        path: &str,
    ) -> StoreResult<Result<bool, Vec<String>>> {
        self.write(async |c| {
            // The write lock first, as in `insert_dataset`; then the jobs are read under it.
            sqlx::query("UPDATE datasets SET name = name WHERE name = $1")
                .bind(&d.name)
                .execute(&mut *c)
                .await?;
            let users = sqlx::query(
                "SELECT id FROM jobs WHERE dataset_path = $1 AND state IN ('QUEUED', 'RUNNING')",
            )
            .bind(path)
            .fetch_all(&mut *c)
            .await?;
            if !users.is_empty() {
                let ids = users
                    .iter()
                    .map(|r| r.try_get::<String, _>("id"))
                    .collect::<Result<_, _>>()?;
                return Ok(Err(ids));
            }
            sqlx::query("DELETE FROM datasets WHERE name = $1")
                .bind(&d.name)
                .execute(&mut *c)
                .await?;
            let shared = sqlx::query("SELECT name FROM datasets WHERE sha256 = $1")
                .bind(&d.sha256)
                .fetch_optional(&mut *c)
                .await?;
            Ok(Ok(shared.is_some()))
        })
        .await
    }
}

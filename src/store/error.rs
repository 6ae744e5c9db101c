//! What a store call can fail with, as callers branch on it: the job is another attempt's
//! now ([`LeaseLost`]: stop writing), the store cannot be reached ([`StoreUnavailable`]:
//! UNAVAILABLE, retry), or anything else the database said.

use super::availability::unavailable;
use super::{LeaseLost, StoreUnavailable};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    LeaseLost(#[from] LeaseLost),
    #[error(transparent)]
    Unavailable(#[from] StoreUnavailable),
    #[error("{0:#}")]
    Db(anyhow::Error),
}

pub type StoreResult<T> = Result<T, StoreError>;

impl StoreError {
    pub fn is_lease_lost(&self) -> bool {
        matches!(self, Self::LeaseLost(_))
    }

    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}

/// Sorts an error from inside the store (a fenced write's check, a driver error) into its
/// kind.
impl From<anyhow::Error> for StoreError {
    fn from(e: anyhow::Error) -> Self {
        match e.downcast::<LeaseLost>() {
            Ok(lost) => Self::LeaseLost(lost),
            Err(e) => match unavailable(&e) {
                Some(down) => Self::Unavailable(down),
                None => Self::Db(e),
            },
        }
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        anyhow::Error::from(e).into()
    }
}

impl From<serde_json::Error> for StoreError {
    fn from(e: serde_json::Error) -> Self {
        Self::Db(e.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_sorted_by_what_callers_do_about_them() {
        let lost = anyhow::Error::from(LeaseLost {
            job: uuid::Uuid::nil(),
            attempt: 2,
        });
        assert!(StoreError::from(lost.context("recording an epoch")).is_lease_lost());
        assert!(StoreError::from(sqlx::Error::PoolTimedOut).is_unavailable());
        let down = StoreError::from(anyhow::Error::from(StoreUnavailable("probe".into())));
        assert!(down.is_unavailable());
        assert!(down.to_string().contains("the job store is unavailable"));
        // Passed up through `anyhow` and sorted again: the reason, said once.
        let again = StoreError::from(anyhow::Error::from(down).context("reading the job"));
        let message = again.to_string();
        assert!(
            again.is_unavailable() && message.matches("unavailable").count() == 1,
            "{message}"
        );
        let other = StoreError::from(sqlx::Error::RowNotFound);
        assert!(!other.is_lease_lost() && !other.is_unavailable());
    }
}

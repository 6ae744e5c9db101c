//! Request errors and the gRPC status each one becomes.

use tonic::{Code, Status};

/// Why a request failed, in the terms of the gRPC status it maps to.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ApiError {
    /// A field of the request is wrong: the message names it.
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    DeadlineExceeded(String),
    /// Shared, so that one failure can answer several requests (a batch's).
    #[error("internal error: {0:#}")]
    Internal(std::sync::Arc<anyhow::Error>),
}

/// A failure below the API: UNAVAILABLE when the job store could not be reached (clients and
/// load balancers retry those elsewhere), INTERNAL otherwise.
impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        match crate::store::unavailable(&e) {
            Some(down) => Self::Unavailable(down.to_string()),
            None => Self::internal(e),
        }
    }
}

/// A store call that failed: UNAVAILABLE when the store could not be reached, else INTERNAL.
impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        match e {
            crate::store::StoreError::Unavailable(down) => Self::Unavailable(down.to_string()),
            other => Self::internal(other.into()),
        }
    }
}

/// The artifact store: FAILED_PRECONDITION when it refuses this server (an operator's
/// setting), UNAVAILABLE when it cannot be reached, INTERNAL for a local file.
impl From<crate::artifacts::ArtifactError> for ApiError {
    fn from(e: crate::artifacts::ArtifactError) -> Self {
        use crate::artifacts::ArtifactError as E;
        match e {
            E::Refused { .. } => Self::FailedPrecondition(e.to_string()),
            E::Unavailable { .. } => Self::Unavailable(e.to_string()),
            E::Local(e) => Self::internal(e),
        }
    }
}

impl ApiError {
    /// An internal error (a bug or an environment failure): logged when it becomes a status.
    pub fn internal(e: anyhow::Error) -> Self {
        Self::Internal(std::sync::Arc::new(e))
    }

    /// An invalid field: "`field`: `message`".
    pub fn field(field: &str, message: impl std::fmt::Display) -> Self {
        Self::InvalidArgument(format!("{field}: {message}"))
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        let code = match &e {
            ApiError::InvalidArgument(_) => Code::InvalidArgument,
            ApiError::NotFound(_) => Code::NotFound,
            ApiError::FailedPrecondition(_) => Code::FailedPrecondition,
            ApiError::ResourceExhausted(_) => Code::ResourceExhausted,
            ApiError::Unavailable(_) => Code::Unavailable,
            ApiError::DeadlineExceeded(_) => Code::DeadlineExceeded,
            ApiError::Internal(err) => {
                tracing::error!(error = %format!("{err:#}"), "internal error");
                Code::Internal
            }
        };
        Status::new(code, e.to_string())
    }
}

/// Parses a UUID field.
pub fn parse_uuid(field: &str, value: &str) -> Result<uuid::Uuid, ApiError> {
    if value.is_empty() {
        return Err(ApiError::field(field, "is empty; expected a UUID"));
    }
    uuid::Uuid::parse_str(value)
        .map_err(|_| ApiError::field(field, format!("'{value}' is not a UUID")))
}

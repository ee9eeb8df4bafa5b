//! The engine's error type; each kind maps to one gRPC status code at the API edge.

use thiserror::Error;

/// Why the engine refused a request. Nothing changed when one of these is returned.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EngineError {
    /// The request is malformed or names impossible values (INVALID_ARGUMENT).
    #[error("{0}")]
    InvalidArgument(String),
    /// The request names an entity, condition or action that does not exist (NOT_FOUND).
    #[error("{0}")]
    NotFound(String),
    /// The request would create something that already exists (ALREADY_EXISTS).
    #[error("{0}")]
    AlreadyExists(String),
    /// The request is valid but not in the current state (FAILED_PRECONDITION).
    #[error("{0}")]
    FailedPrecondition(String),
}

impl EngineError {
    /// An INVALID_ARGUMENT error.
    pub fn invalid(msg: impl Into<String>) -> Self {
        EngineError::InvalidArgument(msg.into())
    }
    /// A NOT_FOUND error.
    pub fn not_found(msg: impl Into<String>) -> Self {
        EngineError::NotFound(msg.into())
    }
    /// An ALREADY_EXISTS error.
    pub fn exists(msg: impl Into<String>) -> Self {
        EngineError::AlreadyExists(msg.into())
    }
    /// A FAILED_PRECONDITION error.
    pub fn precondition(msg: impl Into<String>) -> Self {
        EngineError::FailedPrecondition(msg.into())
    }
}

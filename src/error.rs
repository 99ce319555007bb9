//! The hub's error type, mapped once to wire codes (SPEC.md section 6) and HTTP statuses.

use http::StatusCode;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    RateLimited(String),
    /// A feed position retention dropped (410).
    #[error("{0}")]
    Gone(String),
    /// The store could not make a write durable; nothing was acknowledged.
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The `code` of an `error` message or HTTP error body.
    pub fn code(&self) -> &'static str {
        match self {
            Error::BadRequest(_) => "bad_request",
            Error::Unauthorized(_) => "unauthorized",
            Error::Forbidden(_) => "forbidden",
            Error::NotFound(_) => "not_found",
            Error::Conflict(_) => "conflict",
            Error::RateLimited(_) => "rate_limited",
            Error::Gone(_) => "gone",
            Error::Unavailable(_) | Error::Internal(_) => "internal",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Error::BadRequest(_) => StatusCode::BAD_REQUEST,
            Error::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Error::Forbidden(_) => StatusCode::FORBIDDEN,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::Conflict(_) => StatusCode::CONFLICT,
            Error::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            Error::Gone(_) => StatusCode::GONE,
            Error::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn bad(msg: impl Into<String>) -> Error {
        Error::BadRequest(msg.into())
    }
}

impl From<crate::store::StoreError> for Error {
    fn from(e: crate::store::StoreError) -> Self {
        match e {
            crate::store::StoreError::Conflict(m) => Error::Conflict(m),
            e => Error::Unavailable(format!("store unavailable: {e}")),
        }
    }
}

impl From<crate::feed::FeedError> for Error {
    fn from(e: crate::feed::FeedError) -> Self {
        match e {
            crate::feed::FeedError::Gone(_) => Error::Gone(e.to_string()),
            crate::feed::FeedError::BadId(_) => Error::BadRequest(e.to_string()),
            crate::feed::FeedError::Store(s) => s.into(),
        }
    }
}

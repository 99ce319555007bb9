//! The hub's error types: [`Error`], mapped once to wire codes and HTTP statuses, and the
//! errors of the store and the feed that map into it. A leaf: it depends on no other module.

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

/// A store's answer to a write or read; see the store module.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    Backend(String),
    #[error("store is closed")]
    Closed,
    /// Not written, and never will be (the hub reloads its state from the store).
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A record changed meanwhile through another node: nothing was written.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The write needs the assigner's lease, which another node holds now.
    #[error("fenced: this node no longer holds the assigner lease")]
    Fenced,
}

/// A feed query that cannot be answered.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FeedError {
    /// The position asked for was dropped by retention: events would be skipped.
    #[error("events after {0} were dropped by retention; reload and continue with after=$")]
    Gone(String),
    #[error("`{0}` is not an event id of this hub")]
    BadId(String),
    #[error(transparent)]
    Store(#[from] StoreError),
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

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(m) => Error::Conflict(m),
            e => Error::Unavailable(format!("store unavailable: {e}")),
        }
    }
}

impl From<FeedError> for Error {
    fn from(e: FeedError) -> Self {
        match e {
            FeedError::Gone(_) => Error::Gone(e.to_string()),
            FeedError::BadId(_) => Error::BadRequest(e.to_string()),
            FeedError::Store(s) => s.into(),
        }
    }
}

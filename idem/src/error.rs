//! Store failures (protocol §6, §7), as types.
//!
//! Modelled on sqlx-core's `error.rs`: one `#[non_exhaustive]` enum,
//! [`StoreError`], whose every variant says what failed and keeps the
//! backend's own error as its [`source`](std::error::Error::source).
//! Backends convert their native errors at the edge (`store_error` in each
//! backend), so nothing above the store sees a `sqlx::Error` or a
//! `RedisError`.
//!
//! Protocol outcomes (in flight, completed, mismatch, fenced) are values,
//! never errors: see [`Reservation`](crate::store::Reservation) and
//! [`Fence`](crate::store::Fence).

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

/// A boxed error from a backend.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A store failure. Protocol outcomes are never errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The backend could not be reached or refused the call. The source is
    /// the backend's own error (a refused connection, a statement the
    /// server rejected, …).
    #[error("store unavailable: {0}")]
    Unavailable(#[source] BoxError),
    /// The call did not finish within the store time-out (the client gave
    /// up, or the server cancelled the statement at the same bound).
    #[error("store call timed out after {0:?}")]
    Timeout(Duration),
    /// The store is full of in-flight records and cannot take another
    /// (the in-process store's bounds); the text says which bound.
    #[error("store is full: {0}")]
    Capacity(&'static str),
    /// A stored record could not be decoded: the backend holds something
    /// this version never writes.
    #[error("corrupt record: {0}")]
    Corrupt(#[source] Corruption),
    /// The store's configuration was refused (a malformed URL, a bad schema
    /// name or key prefix); raised when the store is built, never per call.
    #[error("invalid store configuration: {0}")]
    Config(#[source] ConfigError),
    /// The store does not (yet) offer this ability; `what` names it (for
    /// instance async mode's queue on a backend that has none). A
    /// configuration problem, not a passing failure: retrying never helps.
    #[error("this store does not support {what}")]
    Unsupported {
        /// The ability asked for.
        what: &'static str,
    },
}

impl StoreError {
    /// Whether the same call may succeed if tried again: the store was
    /// unreachable or slow ([`Unavailable`](Self::Unavailable),
    /// [`Timeout`](Self::Timeout)). A full store, a record the store can
    /// never take ([`Capacity`](Self::Capacity)), a corrupt record or a bad
    /// configuration fail the same way every time: retrying only delays
    /// the caller.
    #[must_use]
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable(_) | Self::Timeout(_))
    }
}

/// What is wrong with a stored record ([`StoreError::Corrupt`]): which part
/// of it, and the backend's decoding error when there is one.
#[derive(Debug)]
pub struct Corruption {
    detail: Cow<'static, str>,
    source: Option<BoxError>,
}

impl Corruption {
    /// A record part holds a value the store never writes; `detail` says
    /// which and what.
    #[must_use]
    pub fn new(detail: impl Into<Cow<'static, str>>) -> Self {
        Self {
            detail: detail.into(),
            source: None,
        }
    }

    /// The backend could not decode `detail` (a column, a reply); `source`
    /// is its own error.
    #[must_use]
    pub fn with_source(detail: impl Into<Cow<'static, str>>, source: impl Into<BoxError>) -> Self {
        Self {
            detail: detail.into(),
            source: Some(source.into()),
        }
    }

    /// The backend's decoder refused the record; `source` says why.
    #[must_use]
    pub fn from_source(source: impl Into<BoxError>) -> Self {
        Self::with_source("", source)
    }

    /// Which part of the record is corrupt, and how (empty when only the
    /// source says).
    #[must_use]
    pub fn detail(&self) -> &str {
        &self.detail
    }
}

impl fmt::Display for Corruption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Like `StoreError::Unavailable`, the reason is part of the message:
        // logs show one line.
        match &self.source {
            Some(source) if self.detail.is_empty() => write!(f, "{source}"),
            Some(source) => write!(f, "{}: {source}", self.detail),
            None => f.write_str(&self.detail),
        }
    }
}

impl std::error::Error for Corruption {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl From<String> for Corruption {
    fn from(detail: String) -> Self {
        Self::new(detail)
    }
}

impl From<&'static str> for Corruption {
    fn from(detail: &'static str) -> Self {
        Self::new(detail)
    }
}

/// Compares the [`detail`](Corruption::detail).
impl PartialEq<str> for Corruption {
    fn eq(&self, other: &str) -> bool {
        self.detail == other
    }
}

/// Compares the [`detail`](Corruption::detail).
impl PartialEq<&str> for Corruption {
    fn eq(&self, other: &&str) -> bool {
        self.detail == *other
    }
}

/// Why a store refused its settings ([`StoreError::Config`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The URL (`what`: "database URL", "Redis URL") does not parse or
    /// names nothing the backend can use; the source is its parser's error.
    #[error("{what}: {source}")]
    Url {
        /// Which URL.
        what: &'static str,
        /// The backend's own reason.
        #[source]
        source: BoxError,
    },
    /// The URL's scheme belongs to another backend.
    #[error("{what}: it must start with {expected}")]
    Scheme {
        /// Which URL.
        what: &'static str,
        /// The schemes this backend accepts.
        expected: &'static str,
    },
    /// A name the backend builds identifiers or keys from (a PostgreSQL
    /// schema, a Redis key prefix) is not allowed.
    #[error("{what} {name:?}: {rule}")]
    Name {
        /// Which setting.
        what: &'static str,
        /// The name as given.
        name: String,
        /// What a valid name looks like.
        rule: &'static str,
    },
    /// A time-out of zero, which would fail every call.
    #[error("{what} must be longer than zero")]
    ZeroTimeout {
        /// Which time-out(s).
        what: &'static str,
    },
    /// A cluster given no node to start from.
    #[error("a Redis Cluster needs at least one node URL")]
    NoNodes,
    /// A store URL whose scheme names no store.
    #[error(
        "`{url}` is not a store: use `memory`, `redis://host:port[/db]` \
         (or rediss://) or `postgres://user@host:port/db` (or postgresql://)"
    )]
    NotAStore {
        /// The URL, password hidden.
        url: String,
    },
    /// A store URL with a scheme and nothing after it.
    #[error("`{url}` has no host")]
    NoHost {
        /// The URL, password hidden.
        url: String,
    },
    /// The URL names a backend this build leaves out.
    #[error(
        "`{url}` needs the {backend} store, which this build of idem leaves out \
         (enable the crate feature `{backend}`)"
    )]
    NotCompiledIn {
        /// The URL, password hidden.
        url: String,
        /// The backend and crate feature: `redis` or `postgres`.
        backend: &'static str,
    },
}

impl From<ConfigError> for StoreError {
    fn from(e: ConfigError) -> Self {
        Self::Config(e)
    }
}

impl From<Corruption> for StoreError {
    fn from(e: Corruption) -> Self {
        Self::Corrupt(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn corruption_keeps_its_source_and_reads_as_one_line() {
        let cause = std::io::Error::other("bad bytes");
        let e = StoreError::Corrupt(Corruption::with_source("column body", cause));
        assert_eq!(e.to_string(), "corrupt record: column body: bad bytes");
        let c = e.source().expect("the corruption");
        assert_eq!(
            c.source().map(ToString::to_string).as_deref(),
            Some("bad bytes")
        );
        let plain = Corruption::from("unknown state 9");
        assert!(plain == "unknown state 9" && plain.source().is_none());
    }

    #[test]
    fn only_an_unreachable_or_slow_store_is_transient() {
        assert!(StoreError::Unavailable("refused".into()).is_transient());
        assert!(StoreError::Timeout(Duration::from_secs(2)).is_transient());
        assert!(!StoreError::Capacity("too large").is_transient());
        assert!(!StoreError::Corrupt(Corruption::new("state 9")).is_transient());
        assert!(!StoreError::Config(ConfigError::NoNodes).is_transient());
    }

    #[test]
    fn config_errors_say_what_and_why() {
        let e = StoreError::from(ConfigError::Name {
            what: "schema name",
            name: "Bad".into(),
            rule: "use a-z",
        });
        assert_eq!(
            e.to_string(),
            "invalid store configuration: schema name \"Bad\": use a-z"
        );
        let e = ConfigError::Url {
            what: "database URL",
            source: "invalid port".into(),
        };
        assert_eq!(e.to_string(), "database URL: invalid port");
        assert!(e.source().is_some());
    }
}

//! Event versions for the stale-event guard (protocol §13).
//!
//! A [`Version`] is what an update carries to say how new it is: a
//! non-negative integer (`42`, a sequence number or a counter) or an
//! RFC 3339 timestamp (`2026-12-02T05:00:00.250Z`, compared as instants,
//! whatever the offset it was written with). Versions of one kind are
//! totally ordered; an entity's versions must all be of one kind: a store
//! refuses an event whose kind differs from the entity's highest completed
//! version ([`VersionBegin::Mixed`](crate::store::VersionBegin::Mixed)),
//! because "is `7` newer than noon?" has no right answer.
//!
//! Stores persist a version as its [`Version::encoded`] text, whose byte
//! order is the versions' order within a kind (Redis compares it in Lua,
//! PostgreSQL with `COLLATE "C"`), so no store needs a big-number type.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::error::StoreError;

/// Nanoseconds per second.
const NANOS: i128 = 1_000_000_000;
/// Digits of an encoded value (`u64::MAX` has 20).
const WIDTH: usize = 20;

/// An event's version: an integer or an instant (protocol §13).
///
/// Ordered within a kind; `Ord` puts every number before every timestamp
/// only so that the type can be sorted: stores never compare across kinds.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub enum Version {
    /// A non-negative integer (0 to 2⁶⁴ − 1).
    Number(u64),
    /// An instant, as nanoseconds since the Unix epoch (UTC): from
    /// 1677-09-21 to 2262-04-11.
    Timestamp(Timestamp),
}

/// An instant: nanoseconds since 1970-01-01T00:00:00Z (negative before).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct Timestamp(i64);

impl Timestamp {
    /// The instant `nanos` nanoseconds after the Unix epoch.
    #[must_use]
    pub fn from_unix_nanos(nanos: i64) -> Self {
        Self(nanos)
    }

    /// Nanoseconds since the Unix epoch.
    #[must_use]
    pub fn unix_nanos(self) -> i64 {
        self.0
    }
}

/// Which kind a [`Version`] is.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum VersionKind {
    /// An integer.
    Number,
    /// An RFC 3339 timestamp.
    Timestamp,
}

impl fmt::Display for VersionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Number => "an integer",
            Self::Timestamp => "an RFC 3339 timestamp",
        })
    }
}

/// Why a text is not a [`Version`]; the reason is fit to show a client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid version: {reason}")]
pub struct InvalidVersion {
    reason: &'static str,
}

impl InvalidVersion {
    fn new(reason: &'static str) -> Self {
        Self { reason }
    }

    /// Why, in a few words.
    #[must_use]
    pub fn reason(&self) -> &'static str {
        self.reason
    }
}

impl Version {
    /// Its kind.
    #[must_use]
    pub fn kind(&self) -> VersionKind {
        match self {
            Self::Number(_) => VersionKind::Number,
            Self::Timestamp(_) => VersionKind::Timestamp,
        }
    }

    /// The stored form: `n` or `t`, then 20 decimal digits (a timestamp's
    /// nanoseconds offset by 2⁶³ so that earlier is smaller). Within a
    /// kind, byte order is version order; the first byte is the kind.
    #[must_use]
    pub fn encoded(&self) -> String {
        match self {
            Self::Number(n) => format!("n{n:0WIDTH$}"),
            Self::Timestamp(t) => {
                // i64 → u64 preserving order: flip the sign bit.
                let shifted = (t.0 as u64) ^ (1 << 63);
                format!("t{shifted:0WIDTH$}")
            }
        }
    }

    /// Reads the stored form back ([`encoded`](Self::encoded)).
    ///
    /// # Errors
    ///
    /// When `s` is not exactly such a text.
    pub fn from_encoded(s: &str) -> Result<Self, InvalidVersion> {
        let bad = || InvalidVersion::new("not a stored version");
        let (kind, digits) = s.split_at_checked(1).ok_or_else(bad)?;
        if digits.len() != WIDTH || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let n: u64 = digits.parse().map_err(|_| bad())?;
        match kind {
            "n" => Ok(Self::Number(n)),
            "t" => Ok(Self::Timestamp(Timestamp((n ^ (1 << 63)) as i64))),
            _ => Err(bad()),
        }
    }
}

impl FromStr for Version {
    type Err = InvalidVersion;

    /// Digits only → [`Version::Number`]; otherwise an RFC 3339 timestamp
    /// (`YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)`, `T` or `t` or a space,
    /// `Z` or `z`), read as an instant. Surrounding spaces and tabs are
    /// ignored (HTTP header values may carry them).
    fn from_str(s: &str) -> Result<Self, InvalidVersion> {
        let s = s.trim_matches([' ', '\t']);
        if s.is_empty() {
            return Err(InvalidVersion::new("empty"));
        }
        if s.bytes().all(|b| b.is_ascii_digit()) {
            return s
                .parse::<u64>()
                .map(Self::Number)
                .map_err(|_| InvalidVersion::new("integer larger than 18446744073709551615"));
        }
        parse_rfc3339(s).map(Self::Timestamp)
    }
}

impl fmt::Display for Version {
    /// A number in decimal; a timestamp in RFC 3339, UTC (`Z`), with as
    /// many fraction digits as it needs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Number(n) => write!(f, "{n}"),
            Self::Timestamp(t) => fmt::Display::fmt(t, f),
        }
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Every i64 of nanoseconds lies within `time`'s years 1..=9999, so
        // neither step fails; RFC 3339 in UTC prints `Z` and only the
        // fraction digits it needs.
        let text = OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.0))
            .ok()
            .and_then(|t| t.format(&Rfc3339).ok())
            .ok_or(fmt::Error)?;
        f.write_str(&text)
    }
}

/// Parses an RFC 3339 `date-time` into an instant, with the `time` crate.
///
/// Two things differ from `time`'s own reading, on purpose: the date and
/// the time must be separated by `T`, `t` or a space (`time` takes any
/// byte there), and a leap second (`:60`) is read as the next second's
/// start on any day (`time` reads it as 23:59:59.999999999 and only at a
/// month's end, which would make two events within a leap second equal).
fn parse_rfc3339(s: &str) -> Result<Timestamp, InvalidVersion> {
    let shape = || {
        InvalidVersion::new(
            "neither an integer nor an RFC 3339 timestamp (YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM))",
        )
    };
    if !matches!(s.as_bytes().get(10), Some(b'T' | b't' | b' ')) {
        return Err(shape());
    }
    let leap = s.get(17..19) == Some("60");
    let parsed = if leap {
        OffsetDateTime::parse(&format!("{}59{}", &s[..17], &s[19..]), &Rfc3339)
    } else {
        OffsetDateTime::parse(s, &Rfc3339)
    };
    let instant = parsed.map_err(|e| match e {
        time::error::Parse::TryFromParsed(time::error::TryFromParsed::ComponentRange(r))
            if r.name().starts_with("offset") =>
        {
            InvalidVersion::new("time zone offset out of range")
        }
        time::error::Parse::TryFromParsed(_) => InvalidVersion::new("date or time out of range"),
        _ => shape(),
    })?;
    let nanos = instant.unix_timestamp_nanos() + if leap { NANOS } else { 0 };
    i64::try_from(nanos)
        .map(Timestamp)
        .map_err(|_| InvalidVersion::new("timestamp outside 1677-09-21 .. 2262-04-11"))
}

/// What `Engine::apply_if_newer` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied<T> {
    /// The update ran (its version is now the entity's) and returned this.
    Applied(T),
    /// The update is stale: its version is ≤ the entity's highest
    /// completed one, and it did not run. `current == version` means this
    /// very version was applied before (a redelivery).
    Stale {
        /// The entity's highest completed version.
        current: Version,
    },
}

/// Why `Engine::apply_if_newer` neither applied the update nor found it
/// stale.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApplyError<E> {
    /// The closure failed; the entity's version is unchanged, so a
    /// redelivery runs it again.
    #[error("the update failed")]
    Failed(#[source] E),
    /// Another update of this entity is in flight (`reject`, or `wait`
    /// past `wait_timeout`); retry after this long.
    #[error("another update of this entity is in progress; retry in {retry_after:?}")]
    InProgress {
        /// Time left on the holder's lease.
        retry_after: Duration,
    },
    /// The version is an integer and the entity's a timestamp, or the other
    /// way round: one entity's versions must be of one kind.
    #[error("version kinds are mixed: this entity's versions are {}", .current.kind())]
    Mixed {
        /// The entity's highest completed version.
        current: Version,
    },
    /// The store failed (and `fail = closed`).
    #[error(transparent)]
    Store(StoreError),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        s.parse().unwrap_or_else(|e| panic!("{s:?}: {e}"))
    }

    #[test]
    fn numbers_and_timestamps_parse() {
        assert_eq!(v("0"), Version::Number(0));
        assert_eq!(v(" 42 "), Version::Number(42));
        assert_eq!(v("18446744073709551615"), Version::Number(u64::MAX));
        assert_eq!(v("1970-01-01T00:00:00Z"), Version::Timestamp(Timestamp(0)));
        assert_eq!(
            v("1970-01-01T00:00:01.5Z"),
            Version::Timestamp(Timestamp(1_500_000_000))
        );
        // The same instant written with two offsets is one version.
        assert_eq!(v("2026-12-02T06:00:00+01:00"), v("2026-12-02T05:00:00Z"));
        assert_eq!(v("2026-12-02t05:00:00z"), v("2026-12-02 05:00:00Z"));
        assert!(v("2026-12-02T05:00:00.000000001Z") > v("2026-12-02T05:00:00Z"));
        assert!(v("2026-12-02T05:00:00-00:30") > v("2026-12-02T05:00:00Z"));
        assert_eq!(
            v("1969-12-31T23:59:59Z"),
            Version::Timestamp(Timestamp(-NANOS as i64))
        );
        assert_eq!(
            v("2024-02-29T00:00:00Z").to_string(),
            "2024-02-29T00:00:00Z"
        );
        // A leap second is the next second's start, on any day.
        assert_eq!(v("2026-12-02T05:00:60Z"), v("2026-12-02T05:01:00Z"));
        assert_eq!(
            v("2026-12-31T23:59:60.5+01:00"),
            v("2026-12-31T23:00:00.5Z")
        );
        // Fraction digits past the ninth are dropped.
        assert_eq!(
            v("1970-01-01T00:00:00.0000000019Z"),
            Version::Timestamp(Timestamp(1))
        );
    }

    #[test]
    fn bad_texts_are_refused() {
        for bad in [
            "",
            "  ",
            "-1",
            "+1",
            "1.5",
            "18446744073709551616",
            "abc",
            "2026-12-02",
            "2026-12-02T05:00:00",
            "2026-12-02X05:00:00Z",
            "2026-12-02\u{e9}05:00:00Z",
            "2026-12-02T05:00:61Z",
            "2026-12-02T05:60:00Z",
            "2026-12-02T05:00:00+01:60",
            "2026-12-02T05:00:00.5",
            "2026-13-02T05:00:00Z",
            "2026-02-30T05:00:00Z",
            "2023-02-29T05:00:00Z",
            "2026-12-02T24:00:00Z",
            "2026-12-02T05:00:00.Z",
            "2026-12-02T05:00:00+0100",
            "2026-12-02T05:00:00+24:00",
            "2026-12-02T05:00:00ZZ",
            "9999-12-31T23:59:59Z",
            "2026-12-02T05:00:00Z\u{e9}",
            "\u{e9}026-12-02T05:00:00Z",
        ] {
            assert!(bad.parse::<Version>().is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "7",
            "2026-12-02T05:00:00Z",
            "2026-12-02T05:00:00.25Z",
            "1677-09-21T00:12:43.145224192Z",
            "2262-04-11T23:47:16.854775807Z",
            "1900-03-01T00:00:00.000000001Z",
        ] {
            assert_eq!(v(s).to_string(), s);
        }
    }

    #[test]
    fn encoding_keeps_the_order() {
        let mut all: Vec<Version> = [0u64, 1, 9, 10, 99, 100, u64::MAX - 1, u64::MAX]
            .into_iter()
            .map(Version::Number)
            .collect();
        all.extend(
            [i64::MIN, -NANOS as i64, -1, 0, 1, NANOS as i64, i64::MAX]
                .into_iter()
                .map(|n| Version::Timestamp(Timestamp(n))),
        );
        for (a, b) in all.iter().zip(all.iter().skip(1)) {
            assert!(a < b);
            if a.kind() == b.kind() {
                assert!(a.encoded() < b.encoded(), "{a:?} {b:?}");
            }
        }
        for x in &all {
            assert_eq!(x.encoded().len(), 21);
            assert_eq!(Version::from_encoded(&x.encoded()), Ok(*x));
        }
        for bad in [
            "",
            "n",
            "x00000000000000000001",
            "n0000000000000000001",
            "n1844674407370955161a",
        ] {
            assert!(Version::from_encoded(bad).is_err(), "{bad:?}");
        }
    }
}

//! Durations and sizes as people write them: `"30s"`, `"1h30m"`, `"1MiB"`.
//!
//! One parser and one formatter for each, shared by the configuration (every
//! time-out, retention and byte limit) and `idem race --duration`, so a
//! value is written the same way everywhere and [`format_duration`] /
//! [`format_size`] print what [`parse_duration`] / [`parse_size`] read back.

use std::fmt;
use std::time::Duration;

/// 1024 bytes.
pub const KIB: u64 = 1024;
/// 1024 KiB.
pub const MIB: u64 = 1024 * KIB;
/// 1024 MiB.
pub const GIB: u64 = 1024 * MIB;
/// 1024 GiB.
pub const TIB: u64 = 1024 * GIB;

/// Duration units, largest first, in milliseconds.
const DURATION_UNITS: [(&str, u64); 5] = [
    ("d", 86_400_000),
    ("h", 3_600_000),
    ("m", 60_000),
    ("s", 1_000),
    ("ms", 1),
];

/// The largest duration accepted: 100 years. Anything larger is a typo, and
/// `Instant + duration` would overflow.
pub const MAX_DURATION: Duration = Duration::from_millis(36_500 * 86_400_000);

/// Byte units, binary first (the order [`format_size`] tries them in).
const SIZE_UNITS: [(&str, u64); 9] = [
    ("TiB", TIB),
    ("GiB", GIB),
    ("MiB", MIB),
    ("KiB", KIB),
    ("TB", 1_000_000_000_000),
    ("GB", 1_000_000_000),
    ("MB", 1_000_000),
    ("kB", 1_000),
    ("B", 1),
];

/// What was being parsed: decides the wording of a [`UnitError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantity {
    /// A duration (`30s`).
    Duration,
    /// A size in bytes (`1MiB`).
    Size,
}

impl Quantity {
    fn hint(self) -> &'static str {
        match self {
            Quantity::Duration => "write a number and a unit (ms, s, m, h, d), e.g. 30s or 1h30m",
            Quantity::Size => "write a number and a unit, e.g. 512KiB, 1MiB or 10MB",
        }
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Quantity::Duration => "duration",
            Quantity::Size => "size",
        })
    }
}

/// What is wrong with a written duration or size.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum UnitProblem {
    /// Nothing was written.
    Empty,
    /// It holds spaces (`10 seconds`, `1 MiB`).
    Spaces,
    /// A bare number: the unit is missing (`30`).
    NoUnit,
    /// A fraction (`1.5s`).
    Fraction,
    /// The last number of a compound duration has no unit (`1h30`).
    TrailingNumber,
    /// A unit that is not one of the known ones.
    UnknownUnit(String),
    /// Units out of order or repeated (`30m1h`, `1s1s`).
    UnitOrder,
    /// Larger than the largest value accepted.
    TooLarge,
    /// Anything else that is not a number followed by a unit.
    Malformed,
}

/// A duration or size that could not be read. `Display` quotes the input
/// and says how to write it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitError {
    quantity: Quantity,
    input: String,
    problem: UnitProblem,
}

impl UnitError {
    fn new(quantity: Quantity, input: &str, problem: UnitProblem) -> Self {
        Self {
            quantity,
            input: input.to_owned(),
            problem,
        }
    }

    /// What was wrong.
    #[must_use]
    pub fn problem(&self) -> &UnitProblem {
        &self.problem
    }

    /// The text as given.
    #[must_use]
    pub fn input(&self) -> &str {
        &self.input
    }
}

impl fmt::Display for UnitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (q, s, hint) = (self.quantity, &self.input, self.quantity.hint());
        let duration = q == Quantity::Duration;
        match &self.problem {
            UnitProblem::Empty => write!(f, "empty {q}: {hint}"),
            UnitProblem::NoUnit if duration => {
                write!(f, "`{s}` has no unit: use a unit: {s}s (or ms, m, h, d)")
            }
            UnitProblem::NoUnit => write!(
                f,
                "`{s}` has no unit: use a unit: {s}B (or KiB, MiB, GiB, kB, MB, GB)"
            ),
            UnitProblem::TooLarge if duration => write!(f, "`{s}` is too large (at most 36500d)"),
            UnitProblem::TooLarge => write!(f, "`{s}` is too large"),
            problem => {
                write!(f, "`{s}` is not a {q}: ")?;
                match problem {
                    UnitProblem::Spaces => write!(f, "spaces are not allowed; {hint}"),
                    UnitProblem::Fraction if duration => f.write_str(
                        "fractions are not supported; use a smaller unit, e.g. 1500ms or 1m30s",
                    ),
                    UnitProblem::Fraction => {
                        f.write_str("fractions are not supported; use a smaller unit, e.g. 1536KiB")
                    }
                    UnitProblem::TrailingNumber => f.write_str("the last number has no unit"),
                    UnitProblem::UnknownUnit(unit) if duration => {
                        write!(f, "unknown unit `{unit}` (units: ms, s, m, h, d)")
                    }
                    UnitProblem::UnknownUnit(unit) => write!(
                        f,
                        "unknown unit `{unit}` (units: B, kB, MB, GB, TB, KiB, MiB, GiB, TiB)"
                    ),
                    UnitProblem::UnitOrder => f.write_str(
                        "units must go from the largest to the smallest, each at most once \
                         (e.g. 1h30m)",
                    ),
                    _ => f.write_str(hint),
                }
            }
        }
    }
}

impl std::error::Error for UnitError {}

/// Checks what both parsers refuse alike: empty, spaces, a bare number.
fn screen(quantity: Quantity, s: &str) -> Result<(), UnitError> {
    let problem = if s.is_empty() {
        UnitProblem::Empty
    } else if s.chars().any(char::is_whitespace) {
        UnitProblem::Spaces
    } else if s.bytes().all(|b| b.is_ascii_digit()) {
        UnitProblem::NoUnit
    } else {
        return Ok(());
    };
    Err(UnitError::new(quantity, s, problem))
}

/// Splits `s` into its leading digits, the letters after them and the rest.
fn number_and_unit(s: &str) -> (&str, &str, &str) {
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    let (number, after) = s.split_at(digits);
    let letters = after.bytes().take_while(u8::is_ascii_alphabetic).count();
    let (unit, rest) = after.split_at(letters);
    (number, unit, rest)
}

/// Parses a duration: a number and a unit (`ms`, `s`, `m`, `h`, `d`), or
/// several from the largest unit to the smallest (`1h30m`). No spaces, no
/// fractions, no bare numbers; `0s` is allowed; at most [`MAX_DURATION`].
///
/// # Errors
///
/// A [`UnitError`] that quotes `s` and says how to write it.
pub fn parse_duration(s: &str) -> Result<Duration, UnitError> {
    let err = |problem| UnitError::new(Quantity::Duration, s, problem);
    screen(Quantity::Duration, s)?;
    let mut rest = s;
    let mut total_ms: u64 = 0;
    let mut last: Option<usize> = None;
    while !rest.is_empty() {
        let (number, unit, after) = number_and_unit(rest);
        if number.is_empty() {
            return Err(err(UnitProblem::Malformed));
        }
        if unit.is_empty() {
            return Err(err(if after.starts_with(['.', ',']) {
                UnitProblem::Fraction
            } else if after.is_empty() {
                UnitProblem::TrailingNumber
            } else {
                UnitProblem::Malformed
            }));
        }
        let Some(rank) = DURATION_UNITS.iter().position(|(u, _)| *u == unit) else {
            return Err(err(UnitProblem::UnknownUnit(unit.to_owned())));
        };
        if last.is_some_and(|l| rank <= l) {
            return Err(err(UnitProblem::UnitOrder));
        }
        last = Some(rank);
        total_ms = number
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(DURATION_UNITS[rank].1))
            .and_then(|ms| total_ms.checked_add(ms))
            .ok_or_else(|| err(UnitProblem::TooLarge))?;
        rest = after;
    }
    let d = Duration::from_millis(total_ms);
    if d > MAX_DURATION {
        return Err(err(UnitProblem::TooLarge));
    }
    Ok(d)
}

/// Parses a size: a whole number and a unit, `B`, `kB`/`KB`, `MB`, `GB`,
/// `TB` (powers of 1000) or `KiB`, `MiB`, `GiB`, `TiB` (powers of 1024).
/// Units are case-insensitive; no spaces, no fractions, no bare numbers (a
/// TOML integer, not a string, is taken as bytes).
///
/// # Errors
///
/// A [`UnitError`] that quotes `s` and says how to write it.
pub fn parse_size(s: &str) -> Result<u64, UnitError> {
    let err = |problem| UnitError::new(Quantity::Size, s, problem);
    screen(Quantity::Size, s)?;
    let (number, _, _) = number_and_unit(s);
    let unit = &s[number.len()..];
    if number.is_empty() {
        return Err(err(UnitProblem::Malformed));
    }
    if unit.starts_with(['.', ',']) {
        return Err(err(UnitProblem::Fraction));
    }
    let Some((_, scale)) = SIZE_UNITS
        .iter()
        .find(|(u, _)| u.eq_ignore_ascii_case(unit))
    else {
        return Err(err(UnitProblem::UnknownUnit(unit.to_owned())));
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(*scale))
        .ok_or_else(|| err(UnitProblem::TooLarge))
}

/// `30s`, `1h30m`, `24h`, `500ms`: the inverse of [`parse_duration`],
/// written as the docs write durations: hours stay hours (`24h`, `168h`),
/// days are never used. Below a millisecond, `Duration`'s own `Debug`
/// (`250µs`).
#[must_use]
pub fn format_duration(d: Duration) -> String {
    if d.is_zero() {
        return "0s".to_owned();
    }
    if d < Duration::from_millis(1) {
        return format!("{d:?}");
    }
    let mut ms = d.as_millis();
    let mut out = String::new();
    for (unit, scale) in DURATION_UNITS.into_iter().filter(|(u, _)| *u != "d") {
        let scale = u128::from(scale);
        if ms >= scale {
            out.push_str(&format!("{}{unit}", ms / scale));
            ms %= scale;
        }
    }
    out
}

/// `1MiB`, `10MB`, `1500B`: the largest unit that divides exactly.
#[must_use]
pub fn format_size(n: u64) -> String {
    if n == 0 {
        return "0B".to_owned();
    }
    SIZE_UNITS
        .iter()
        .find(|(_, scale)| n.is_multiple_of(*scale))
        .map_or_else(
            || format!("{n}B"),
            |(unit, scale)| format!("{}{unit}", n / scale),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let ok = [
            ("0s", 0),
            ("500ms", 500),
            ("30s", 30_000),
            ("10m", 600_000),
            ("24h", 86_400_000),
            ("7d", 604_800_000),
            ("1h30m", 5_400_000),
            ("1d2h3m4s5ms", 93_784_005),
            ("36500d", 36_500 * 86_400_000),
        ];
        for (s, ms) in ok {
            assert_eq!(parse_duration(s), Ok(Duration::from_millis(ms)), "{s}");
            assert_eq!(
                parse_duration(&format_duration(Duration::from_millis(ms))),
                Ok(Duration::from_millis(ms))
            );
        }
        let bad = [
            ("", "empty"),
            ("30", "use a unit: 30s"),
            ("0", "use a unit"),
            ("10 seconds", "spaces"),
            (" 1s", "spaces"),
            ("1h 30m", "spaces"),
            ("10seconds", "unknown unit `seconds`"),
            ("1.5s", "fractions"),
            ("-1s", "not a duration"),
            ("1h30", "no unit"),
            ("30m1h", "largest to the smallest"),
            ("1s1s", "largest to the smallest"),
            ("1S", "unknown unit"),
            ("s", "not a duration"),
            ("36501d", "too large"),
            ("99999999999999999999s", "too large"),
            ("18446744073709551615d", "too large"),
            ("1d18446744073709551615ms", "too large"),
        ];
        for (s, needle) in bad {
            let e = parse_duration(s).expect_err(s).to_string();
            assert!(e.contains(needle), "{s:?}: `{e}` should contain `{needle}`");
        }
        for (ms, shown) in [
            (86_400_000, "24h"),
            (604_800_000, "168h"),
            (93_784_005, "26h3m4s5ms"),
            (5_400_000, "1h30m"),
            (30_000, "30s"),
            (1_500, "1s500ms"),
            (0, "0s"),
        ] {
            assert_eq!(format_duration(Duration::from_millis(ms)), shown);
        }
        assert_eq!(format_duration(Duration::from_micros(250)), "250µs");
        assert_eq!(
            parse_duration("1x").map_err(|e| e.problem().clone()),
            Err(UnitProblem::UnknownUnit("x".to_owned()))
        );
    }

    #[test]
    fn sizes() {
        let ok = [
            ("100B", 100),
            ("0B", 0),
            ("10kB", 10_000),
            ("10KB", 10_000),
            ("10MB", 10_000_000),
            ("2GB", 2_000_000_000),
            ("512KiB", 512 * 1024),
            ("1MiB", 1024 * 1024),
            ("1mib", 1024 * 1024),
            ("1GiB", 1 << 30),
            ("1TiB", 1 << 40),
        ];
        for (s, n) in ok {
            assert_eq!(parse_size(s), Ok(n), "{s}");
            assert_eq!(parse_size(&format_size(n)), Ok(n));
        }
        let bad = [
            ("", "empty"),
            ("1024", "use a unit: 1024B"),
            ("1 MiB", "spaces"),
            ("1.5MiB", "fractions"),
            ("MiB", "not a size"),
            ("-1B", "not a size"),
            ("1XB", "unknown unit"),
            ("17179869184GiB", "too large"),
            ("99999999999999999999B", "too large"),
        ];
        for (s, needle) in bad {
            let e = parse_size(s).expect_err(s).to_string();
            assert!(e.contains(needle), "{s:?}: `{e}` should contain `{needle}`");
        }
    }
}

//! Request paths in one normal form, so that route matching, the
//! fingerprint and the request forwarded upstream all see the *same* path.
//!
//! A client must not be able to slip past `POST /payments/*` by spelling the
//! path another way that the upstream still routes to the same handler:
//! `//payments/1`, `/payments//1`, `/payments/1/`, `/payments/./1`,
//! `/x/../payments/1` and `/%70ayments/1` all normalize to `/payments/1`.
//!
//! The rules (RFC 3986 §6.2.2, plus the two that servers commonly apply):
//! - percent-encoded *unreserved* characters (`A–Z a–z 0–9 - . _ ~`) are
//!   decoded; every other percent-encoding is kept, with upper-case hex;
//! - dot segments (`.`, `..`) are removed; `..` never climbs above `/`;
//! - empty segments (repeated slashes) and a trailing slash are dropped;
//! - case is kept: paths are case-sensitive. (Route *matching* ignores ASCII
//!   case, see [`crate::policy`], so `/Payments/1` cannot skip a rule
//!   either; its fingerprint still differs from `/payments/1`.)
//!
//! Paths that cannot be normalized without guessing how the upstream reads
//! them are refused ([`PathError`]): an encoded slash or backslash (`%2F`,
//! `%5C`: one segment here, two for many servers), a raw backslash, an
//! encoded NUL, and malformed percent-encoding.

use std::borrow::Cow;

/// Why a path is refused (the client gets 400 `request_path_invalid`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PathError {
    /// `%` not followed by two hex digits.
    #[error("the path has a '%' at byte {at} that is not followed by two hex digits")]
    BadEncoding {
        /// Byte offset of the `%` in the path.
        at: usize,
    },
    /// `%2F`, `%5C` or a raw `\`: a separator some servers split on and
    /// others do not.
    #[error(
        "the path contains an encoded slash or a backslash at byte {at}, which servers read differently"
    )]
    AmbiguousSeparator {
        /// Byte offset in the path.
        at: usize,
    },
    /// `%00`.
    #[error("the path contains an encoded NUL at byte {at}")]
    Nul {
        /// Byte offset in the path.
        at: usize,
    },
    /// The normal form could not be written back into the request target.
    /// Not expected: every byte of it comes from a valid target.
    #[error("the normalized path cannot be written back into the request")]
    Unrepresentable,
}

/// The normal form of `path` (the path component of a request target,
/// without its query). Borrows when `path` is already normal, which is the
/// common case and costs one scan.
///
/// `*` (the asterisk-form of `OPTIONS *`) and paths that do not start with
/// `/` are returned as they are.
///
/// # Errors
///
/// A [`PathError`] when the path cannot be normalized without guessing.
pub fn normalize(path: &str) -> Result<Cow<'_, str>, PathError> {
    if !path.starts_with('/') {
        return Ok(Cow::Borrowed(path));
    }
    if is_normal(path)? {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode_unreserved(path)?;
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() {
        out.push('/');
    }
    Ok(Cow::Owned(out))
}

/// Whether `path` is already in normal form; errors on refused input.
fn is_normal(path: &str) -> Result<bool, PathError> {
    let bytes = path.as_bytes();
    let mut normal = !(bytes.len() > 1 && bytes.ends_with(b"/"));
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'\\' => return Err(PathError::AmbiguousSeparator { at: i }),
            b'%' => {
                let byte = check_escape(bytes, i)?;
                let lower_hex = bytes[i + 1..i + 3].iter().any(u8::is_ascii_lowercase);
                if is_unreserved(byte) || lower_hex {
                    normal = false;
                }
            }
            b'/' => {
                let rest = &bytes[i + 1..];
                if rest.starts_with(b"/")
                    || rest == b"."
                    || rest == b".."
                    || rest.starts_with(b"./")
                    || rest.starts_with(b"../")
                {
                    normal = false;
                }
            }
            _ => {}
        }
    }
    Ok(normal)
}

/// The byte a `%XX` escape at `i` stands for, refusing the ambiguous ones.
fn check_escape(bytes: &[u8], i: usize) -> Result<u8, PathError> {
    let hex = |b: Option<&u8>| b.and_then(|b| (*b as char).to_digit(16));
    let (Some(hi), Some(lo)) = (hex(bytes.get(i + 1)), hex(bytes.get(i + 2))) else {
        return Err(PathError::BadEncoding { at: i });
    };
    // Two hex digits fit a byte.
    let byte = (hi * 16 + lo) as u8;
    match byte {
        b'/' | b'\\' => Err(PathError::AmbiguousSeparator { at: i }),
        0 => Err(PathError::Nul { at: i }),
        _ => Ok(byte),
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Decodes escapes of unreserved characters; upper-cases the hex of the
/// others.
fn decode_unreserved(path: &str) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let byte = check_escape(bytes, i)?;
            if is_unreserved(byte) {
                out.push(byte as char);
            } else {
                out.push_str(&format!("%{byte:02X}"));
            }
            i += 3;
        } else {
            // Copy the run up to the next escape as it is (it may hold
            // UTF-8 that the request line let through).
            let end = bytes[i..]
                .iter()
                .position(|&b| b == b'%')
                .map_or(bytes.len(), |p| i + p);
            out.push_str(&path[i..end]);
            i = end;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(p: &str) -> String {
        normalize(p).expect("normalizes").into_owned()
    }

    #[test]
    fn every_spelling_of_one_path_is_one_path() {
        for p in [
            "/payments/1",
            "//payments/1",
            "/payments//1",
            "/payments/1/",
            "/payments/./1",
            "/x/../payments/1",
            "/%70ayments/1",
            "/payments/%31",
            "/./payments/1/.",
            "/payments/1/x/..",
            "/../payments/1",
            "/%2E%2E/payments/1",
            "/payments/%2e/1",
        ] {
            assert_eq!(n(p), "/payments/1", "{p}");
        }
    }

    #[test]
    fn normal_paths_are_borrowed() {
        for p in ["/", "/a", "/a/b.c/d..e", "/a/.b", "/a%20b", "*"] {
            assert!(matches!(normalize(p), Ok(Cow::Borrowed(_))), "{p}");
        }
    }

    #[test]
    fn the_root_and_other_edges() {
        assert_eq!(n("/"), "/");
        assert_eq!(n("//"), "/");
        assert_eq!(n("/.."), "/");
        assert_eq!(n("/a/.."), "/");
        assert_eq!(n("/a%2fb".replace("%2f", "%20").as_str()), "/a%20b");
        assert_eq!(n("/a%7e%41"), "/a~A");
        assert_eq!(n("/a%c3%a9"), "/a%C3%A9");
        assert_eq!(n("/Payments/1/"), "/Payments/1", "case is kept");
    }

    #[test]
    fn ambiguous_paths_are_refused() {
        assert_eq!(
            normalize("/payments%2F1"),
            Err(PathError::AmbiguousSeparator { at: 9 })
        );
        assert!(normalize("/payments%2f1").is_err());
        assert!(normalize("/payments%5C1").is_err());
        assert!(normalize("/payments\\1").is_err());
        assert_eq!(normalize("/a%00"), Err(PathError::Nul { at: 2 }));
        assert_eq!(normalize("/a%4"), Err(PathError::BadEncoding { at: 2 }));
        assert_eq!(normalize("/a%zz"), Err(PathError::BadEncoding { at: 2 }));
    }
}

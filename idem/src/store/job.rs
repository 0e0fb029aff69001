//! Job bookkeeping beside a key's record (protocol §13): how many times a
//! job's closure has run, whether a run is in progress, and why the last
//! one failed. Kept apart from the record, in a small trace of its own, so
//! it survives a `release` (the record is deleted; the count must not be)
//! and so `reserve` and `complete`, the HTTP hot path, never touch it.
//!
//! Only [`Engine::once`](crate::Engine::once) and
//! [`Engine::once_job`](crate::Engine::once_job) write traces, ONE atomic
//! store call per step ([`Store::begin_attempt`](super::Store::begin_attempt),
//! [`Store::end_attempt`](super::Store::end_attempt)); the
//! gateway and the tower layer never do.

/// Longest failure text kept, in bytes: it is for operators, not a log
/// sink. Longer texts are cut at a character boundary and end with `…`.
pub const MAX_ERROR_BYTES: usize = 1024;

/// A job's trace (protocol §13): what [`Store::attempts`](super::Store::attempts)
/// reads back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempts {
    /// Runs of the job's closure so far, the running one included; the
    /// first run is attempt 1.
    pub count: u32,
    /// Whether the last counted run has not ended (it is running, or its
    /// holder died and its lease is running out).
    pub running: bool,
    /// Why the last ended run failed, if it failed transiently and the
    /// caller said why (at most [`MAX_ERROR_BYTES`]).
    pub last_error: Option<String>,
}

/// `text` cut to at most [`MAX_ERROR_BYTES`] bytes, at a character boundary.
#[must_use]
pub fn bound_error(text: &str) -> String {
    if text.len() <= MAX_ERROR_BYTES {
        return text.to_owned();
    }
    let ellipsis = '…';
    let mut end = MAX_ERROR_BYTES - ellipsis.len_utf8();
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let mut cut = String::with_capacity(MAX_ERROR_BYTES);
    cut.push_str(&text[..end]);
    cut.push(ellipsis);
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_errors_are_cut_at_a_character_boundary() {
        assert_eq!(bound_error("short"), "short");
        let long = "é".repeat(MAX_ERROR_BYTES);
        let cut = bound_error(&long);
        assert!(cut.len() <= MAX_ERROR_BYTES, "{}", cut.len());
        assert!(cut.ends_with('…'));
    }
}

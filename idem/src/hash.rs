//! Small hashing helpers shared by keys, scopes and fingerprints.

/// Hashes `bytes` length-prefixed, so consecutive fields cannot run into each
/// other.
pub(crate) fn put(h: &mut blake3::Hasher, bytes: &[u8]) {
    put_len(h, bytes.len());
    h.update(bytes);
}

/// Hashes a length (as u64, little endian).
pub(crate) fn put_len(h: &mut blake3::Hasher, len: usize) {
    h.update(&(len as u64).to_le_bytes());
}

/// Appends `bytes` as lowercase hex.
pub(crate) fn push_hex(s: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for &b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0F)]));
    }
}

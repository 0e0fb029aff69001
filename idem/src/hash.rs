//! Small hashing helpers shared by keys, scopes and fingerprints.

/// A BLAKE3 hasher fed through a buffer on the stack. A request's
/// fingerprint and scope are many small fields (each length-prefixed), and
/// every `blake3::Hasher::update` call has a fixed cost; gathered first,
/// they reach the hasher in one call. The bytes hashed are the same, and so
/// is the hash (pinned by the tests of `fingerprint` and `key`).
pub(crate) struct Feed {
    hasher: blake3::Hasher,
    buf: [u8; FEED_BUF],
    len: usize,
}

/// Bytes gathered before they are handed to the hasher; a larger field
/// goes to it directly.
const FEED_BUF: usize = 512;

impl Feed {
    pub(crate) fn new() -> Self {
        Self {
            hasher: blake3::Hasher::new(),
            buf: [0; FEED_BUF],
            len: 0,
        }
    }

    fn update(&mut self, bytes: &[u8]) {
        let end = self.len + bytes.len();
        if let Some(room) = self.buf.get_mut(self.len..end) {
            room.copy_from_slice(bytes);
            self.len = end;
            return;
        }
        self.flush();
        match self.buf.get_mut(..bytes.len()) {
            Some(room) if bytes.len() < FEED_BUF => {
                room.copy_from_slice(bytes);
                self.len = bytes.len();
            }
            _ => {
                self.hasher.update(bytes);
            }
        }
    }

    fn flush(&mut self) {
        if let Some(gathered) = self.buf.get(..self.len) {
            self.hasher.update(gathered);
        }
        self.len = 0;
    }

    pub(crate) fn finalize(mut self) -> blake3::Hash {
        self.flush();
        self.hasher.finalize()
    }
}

/// Hashes `bytes` length-prefixed, so consecutive fields cannot run into each
/// other.
pub(crate) fn put(h: &mut Feed, bytes: &[u8]) {
    put_len(h, bytes.len());
    h.update(bytes);
}

/// Hashes a length (as u64, little endian).
pub(crate) fn put_len(h: &mut Feed, len: usize) {
    h.update(&(len as u64).to_le_bytes());
}

/// Each byte as its two lowercase hex digits: the one hex encoder of
/// tokens, fingerprints, scopes and keys, whether into a `String`
/// ([`push_hex`]), a buffer ([`hex_into`]) or compared in place.
pub(crate) const HEX_PAIRS: [[u8; 2]; 256] = {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut t = [[0; 2]; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = [DIGITS[i >> 4], DIGITS[i & 0x0f]];
        i += 1;
    }
    t
};

/// Appends `bytes` as lowercase hex.
pub(crate) fn push_hex(s: &mut String, bytes: &[u8]) {
    s.reserve(bytes.len() * 2);
    for &b in bytes {
        let [hi, lo] = HEX_PAIRS[usize::from(b)];
        s.push(char::from(hi));
        s.push(char::from(lo));
    }
}

/// Writes `bytes` as lowercase hex into `out`, two digits per byte (as
/// many bytes as `out` has room for).
#[cfg(feature = "redis")]
pub(crate) fn hex_into(out: &mut [u8], bytes: &[u8]) {
    for (pair, &b) in out.chunks_exact_mut(2).zip(bytes) {
        pair.copy_from_slice(&HEX_PAIRS[usize::from(b)]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whatever the sizes of the pieces, the feed hashes what one hasher
    /// given the same bytes in one call would.
    #[test]
    fn the_feed_hashes_the_same_bytes_as_one_update() {
        let data: Vec<u8> = (0..5000_u32).map(|i| (i % 251) as u8).collect();
        for sizes in [
            &[1_usize, 7, 8, 100][..],
            &[511, 1, 512, 513],
            &[600, 3, 4000],
            &[0, 0, 5],
        ] {
            let mut feed = Feed::new();
            let (mut at, mut i) = (0, 0);
            while at < data.len() {
                let n = sizes[i % sizes.len()].min(data.len() - at);
                feed.update(&data[at..at + n]);
                at += n;
                i += 1;
                if i > 100_000 {
                    break; // sizes of zero only
                }
            }
            let mut whole = blake3::Hasher::new();
            whole.update(&data[..at]);
            assert_eq!(feed.finalize(), whole.finalize(), "pieces of {sizes:?}");
        }
    }
}

//! Small hashing helpers shared by keys, scopes and fingerprints.

/// A BLAKE3 hasher fed through a buffer on the stack. A request's
/// fingerprint and scope are many small fields (each length-prefixed), and
/// every `blake3::Hasher::update` call has a fixed cost; gathered first,
/// they reach the hasher in one call. The bytes hashed are the same, and so
/// is the hash (pinned by the tests of `fingerprint` and `key`).
///
/// The hasher itself (about 2 KB of state) is made only once the fields
/// outgrow the buffer; fields that fit (a scope, most fingerprints) are
/// hashed in one `blake3::hash` call, which needs no such state.
pub(crate) struct Feed {
    hasher: Option<Box<blake3::Hasher>>,
    buf: [u8; FEED_BUF],
    len: usize,
}

/// Bytes gathered before they are handed to the hasher; a larger field
/// goes to it directly.
const FEED_BUF: usize = 512;

impl Feed {
    pub(crate) fn new() -> Self {
        Self {
            hasher: None,
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
                Self::hasher(&mut self.hasher).update(bytes);
            }
        }
    }

    /// The hasher in `slot`, made on first use.
    fn hasher(slot: &mut Option<Box<blake3::Hasher>>) -> &mut blake3::Hasher {
        slot.get_or_insert_with(|| Box::new(blake3::Hasher::new()))
    }

    fn flush(&mut self) {
        let len = std::mem::take(&mut self.len);
        if let Some(gathered) = self.buf.get(..len).filter(|g| !g.is_empty()) {
            Self::hasher(&mut self.hasher).update(gathered);
        }
    }

    pub(crate) fn finalize(mut self) -> blake3::Hash {
        if self.hasher.is_none() {
            // All of it is in the buffer: hashed at once.
            return blake3::hash(self.buf.get(..self.len).unwrap_or_default());
        }
        self.flush();
        Self::hasher(&mut self.hasher).finalize()
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
        // Totals around the buffer's size: hashed at once, or by the hasher.
        for total in [
            0,
            1,
            100,
            FEED_BUF - 1,
            FEED_BUF,
            FEED_BUF + 1,
            3 * FEED_BUF,
        ] {
            let mut feed = Feed::new();
            for piece in data[..total].chunks(37) {
                feed.update(piece);
            }
            assert_eq!(
                feed.finalize(),
                blake3::hash(&data[..total]),
                "{total} bytes"
            );
        }
    }
}

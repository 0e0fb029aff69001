//! One script call as one `EVALSHA` command, its arguments written
//! straight into the command's buffer.
//!
//! `redis::ScriptInvocation` keeps every key and argument as a `Vec<u8>` of
//! its own and copies them all into a `Cmd` when the call is sent; a fresh
//! request's two calls paid about twenty allocations and a second copy of
//! the stored answer (headers and body) for it. [`Invocation`] builds the
//! `Cmd` at once, and the argument types below ([`Hex`], [`Headers`],
//! [`Tagged`]) write themselves into it without a `String` or `Vec` of
//! their own. What goes over the wire is unchanged: the same `EVALSHA`, the
//! same arguments, and `NOSCRIPT` answered by loading the script and
//! sending the call again, as `ScriptInvocation` does.

use std::io::Write;

use ::redis::{Cmd, RedisWrite, Script, ToRedisArgs};
use bytes::Bytes;

use super::reply::HEADERS_V1;
use crate::hash::{hex_into, push_hex};
use crate::record::Token;

/// An `EVALSHA` of one script, being built: its keys first (as many as
/// declared), then its arguments.
pub(super) struct Invocation<'a> {
    script: &'a Script,
    cmd: Cmd,
    /// Keys declared (`numkeys`), keys given so far, and whether
    /// arguments have begun (keys must come first).
    declared: usize,
    keys: usize,
    args: bool,
}

impl<'a> Invocation<'a> {
    /// A call of `script` with `keys` keys (give them first, with
    /// [`key`](Self::key)).
    pub(super) fn new(script: &'a Script, keys: usize) -> Self {
        // Room for the usual call (a dozen arguments, a small answer) in one
        // allocation each, not a doubling from empty; a large body grows it.
        let mut cmd = Cmd::with_capacity(16, 512);
        cmd.arg("EVALSHA").arg(script.get_hash()).arg(keys);
        Self {
            script,
            cmd,
            declared: keys,
            keys: 0,
            args: false,
        }
    }

    /// Adds a key (`KEYS[i]`).
    pub(super) fn key<T: ToRedisArgs>(&mut self, key: T) -> &mut Self {
        debug_assert!(!self.args, "keys go first");
        self.keys += 1;
        self.cmd.arg(key);
        self
    }

    /// Adds an argument (`ARGV[i]`).
    pub(super) fn arg<T: ToRedisArgs>(&mut self, arg: T) -> &mut Self {
        self.args = true;
        self.cmd.arg(arg);
        self
    }

    pub(super) fn script(&self) -> &'a Script {
        self.script
    }

    /// The finished command.
    pub(super) fn cmd(&self) -> &Cmd {
        debug_assert_eq!(self.keys, self.declared, "numkeys and keys disagree");
        &self.cmd
    }
}

/// Bytes as lowercase hex, one argument, written in place (a fencing token
/// or a fingerprint: the scripts store them as hex).
pub(super) struct Hex<const N: usize>(pub(super) [u8; N]);

/// A fencing token as the scripts store it: 32 hex digits.
pub(super) fn token_hex(token: Token) -> Hex<16> {
    Hex(token.as_u128().to_be_bytes())
}

impl<const N: usize> ToRedisArgs for Hex<N> {
    fn write_redis_args<W: ?Sized + RedisWrite>(&self, out: &mut W) {
        // Tokens and fingerprints are 16 and 32 bytes: on the stack.
        let mut buf = [0u8; 64];
        if let Some(hex) = buf.get_mut(..N * 2) {
            hex_into(hex, &self.0);
            out.write_arg(hex);
        } else {
            let mut s = String::with_capacity(N * 2);
            push_hex(&mut s, &self.0);
            out.write_arg(s.as_bytes());
        }
    }
}

/// Response headers in the stored binary layout (see `reply.rs`,
/// `encode_headers`), one argument, written in place.
pub(super) struct Headers<'a>(pub(super) &'a [(String, Bytes)]);

impl ToRedisArgs for Headers<'_> {
    fn write_redis_args<W: ?Sized + RedisWrite>(&self, out: &mut W) {
        let size = 1 + self
            .0
            .iter()
            .map(|(n, v)| 8 + n.len() + v.len())
            .sum::<usize>();
        out.reserve_space_for_args([size]);
        let mut w = out.writer_for_next_arg();
        // Writing into the command's own buffer cannot fail.
        let _ = w.write_all(&[HEADERS_V1]);
        for (name, value) in self.0 {
            for part in [name.as_bytes(), value.as_ref()] {
                // Header names and values are far below 4 GiB (HTTP limits
                // them to kilobytes); saturating keeps the encoder total.
                let len = u32::try_from(part.len()).unwrap_or(u32::MAX);
                let _ = w.write_all(&len.to_be_bytes());
                let _ = w.write_all(part);
            }
        }
    }
}

/// A key `{prefix}{<tag>}<suffix>`, one argument, written in place (see
/// [`RedisStore::record_key`](super::RedisStore::record_key)).
pub(super) struct Tagged<'a> {
    pub(super) prefix: &'a str,
    pub(super) tag: &'a str,
    pub(super) suffix: &'a str,
}

impl ToRedisArgs for Tagged<'_> {
    fn write_redis_args<W: ?Sized + RedisWrite>(&self, out: &mut W) {
        let mut w = out.writer_for_next_arg();
        for part in [self.prefix, "{", self.tag, "}", self.suffix] {
            let _ = w.write_all(part.as_bytes());
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use crate::store::redis::reply::encode_headers;

    fn args(cmd: &Cmd) -> Vec<Vec<u8>> {
        cmd.args_iter()
            .map(|a| match a {
                ::redis::Arg::Simple(b) => b.to_vec(),
                _ => b"<not a plain argument>".to_vec(),
            })
            .collect()
    }

    #[test]
    fn the_command_is_the_one_script_invocation_sent() {
        let script = Script::new("return 1");
        let headers = vec![
            ("content-type".to_owned(), Bytes::from_static(b"text/plain")),
            ("x-bin".to_owned(), Bytes::from_static(b"\x00\xff\r\n")),
        ];
        let token = 0x0123_4567_89ab_cdef_u128;
        let fp = [0xa5u8; 32];
        let mut new = Invocation::new(&script, 1);
        new.key(Tagged {
            prefix: "p:",
            tag: "k",
            suffix: ":job",
        })
        .arg(token_hex(Token::from_u128(token)))
        .arg(Hex(fp))
        .arg(Headers(&headers))
        .arg(&b"body"[..])
        .arg(42u64);
        let mut expected = ::redis::cmd("EVALSHA");
        expected
            .arg(script.get_hash())
            .arg(1)
            .arg("p:{k}:job")
            .arg(format!("{token:032x}"))
            .arg("a5".repeat(32))
            .arg(encode_headers(&headers))
            .arg(&b"body"[..])
            .arg(42u64);
        assert_eq!(args(new.cmd()), args(&expected));
        assert_eq!(
            new.cmd().get_packed_command(),
            expected.get_packed_command()
        );
    }

    #[test]
    fn tokens_are_fixed_width_hex() {
        let hex = |t: u128| {
            let mut c = Cmd::new();
            c.arg(token_hex(Token::from_u128(t)));
            args(&c).remove(0)
        };
        assert_eq!(hex(0), b"0".repeat(32));
        assert_eq!(hex(u128::MAX), b"f".repeat(32));
        assert_eq!(hex(0xab), format!("{:032x}", 0xab).into_bytes());
    }

    #[test]
    fn long_hex_and_empty_headers() {
        let long = [0x0fu8; 40];
        let mut c = Cmd::new();
        c.arg(Hex(long)).arg(Headers(&[]));
        let mut expected = Cmd::new();
        expected.arg("0f".repeat(40)).arg(encode_headers(&[]));
        assert_eq!(args(&c), args(&expected));
    }
}

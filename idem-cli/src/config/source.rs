//! Where a configuration comes from: the file, then the `IDEM_*`
//! environment, then the flags, each overriding the one before (protocol §12);
//! and where a problem is: `file:line`, with a did-you-mean for a misspelt
//! key, the variable or the flag.

use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};

use http::Uri;

use toml::Spanned;

use super::file::{self, FileConfig, Text};
use super::parse;
use super::{Config, ConfigError, Overrides, StoreSpec, DEFAULT_LISTEN};

/// A top-level setting that a flag and an `IDEM_*` variable can set too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setting {
    /// The key in the file.
    pub key: &'static str,
    /// The flag, e.g. `--listen`.
    pub flag: &'static str,
    /// The environment variable, e.g. `IDEM_LISTEN`.
    pub var: &'static str,
}

const fn setting(key: &'static str, flag: &'static str, var: &'static str) -> Setting {
    Setting { key, flag, var }
}

const LISTEN: Setting = setting("listen", "--listen", "IDEM_LISTEN");
const UPSTREAM: Setting = setting("upstream", "--upstream", "IDEM_UPSTREAM");
const STORE: Setting = setting("store", "--store", "IDEM_STORE");
const ADMIN_LISTEN: Setting = setting("admin_listen", "--admin-listen", "IDEM_ADMIN_LISTEN");
const TLS_CERT: Setting = setting("tls_cert", "--tls-cert", "IDEM_TLS_CERT");
const TLS_KEY: Setting = setting("tls_key", "--tls-key", "IDEM_TLS_KEY");
const UPSTREAM_CA: Setting = setting("upstream_ca", "--upstream-ca", "IDEM_UPSTREAM_CA");
const STORE_CA: Setting = setting("store_ca", "--store-ca", "IDEM_STORE_CA");

/// Every setting with a flag and a variable (`--help` names them all).
pub const SETTINGS: [Setting; 8] = [
    LISTEN,
    UPSTREAM,
    STORE,
    ADMIN_LISTEN,
    TLS_CERT,
    TLS_KEY,
    UPSTREAM_CA,
    STORE_CA,
];

/// Reads the file (if any), then IDEM_* environment (via `env` lookup fn, so
/// tests don't touch the real process env), then flags. Precedence: flags >
/// env > file > defaults (protocol §12).
///
/// # Errors
///
/// [`ConfigError::Read`] if the file cannot be read; otherwise the first
/// problem found, naming the file and line, the variable or the flag.
pub fn load(
    path: Option<&Path>,
    env: &dyn Fn(&str) -> Option<String>,
    flags: &Overrides,
) -> Result<Config, ConfigError> {
    let Some(path) = path else {
        let src = Src { name: "", text: "" };
        return build(&src, FileConfig::default(), None, env, flags);
    };
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let name = path.display().to_string();
    let src = Src {
        name: &name,
        text: &text,
    };
    let file = src.parse()?;
    build(&src, file, Some(path.to_owned()), env, flags)
}

/// Same as [`load`] but from a string (tests; `name` is used in messages as
/// the file name, and becomes [`Config::source`]).
///
/// # Errors
///
/// As [`load`], except that nothing is read from disk.
pub fn load_str(
    name: &str,
    toml_src: &str,
    env: &dyn Fn(&str) -> Option<String>,
    flags: &Overrides,
) -> Result<Config, ConfigError> {
    let src = Src {
        name,
        text: toml_src,
    };
    let file = src.parse()?;
    build(&src, file, Some(PathBuf::from(name)), env, flags)
}

// ---------------------------------------------------------------------------
// Merging

/// Where a top-level value came from, to blame the right place for a
/// problem found only once everything is merged.
enum Origin {
    Default,
    File(Range<usize>),
    Env(&'static str),
    Flag(&'static str),
}

impl Origin {
    fn error(&self, src: &Src<'_>, reason: String) -> ConfigError {
        match self {
            Origin::File(span) => src.at(span, reason),
            Origin::Env(var) => ConfigError::Env { var, reason },
            Origin::Flag(flag) => ConfigError::Flag { flag, reason },
            // Defaults never conflict with each other; blame the file as a whole.
            Origin::Default => ConfigError::File {
                file: src.name.to_owned(),
                line: None,
                reason,
            },
        }
    }

    fn describe(&self) -> String {
        match self {
            Origin::Default => "the default".to_owned(),
            Origin::File(_) => "the config file".to_owned(),
            Origin::Env(var) => (*var).to_owned(),
            Origin::Flag(flag) => (*flag).to_owned(),
        }
    }
}

/// The layers under a flag: the environment, then the file.
struct Layers<'a> {
    src: &'a Src<'a>,
    env: &'a dyn Fn(&str) -> Option<String>,
}

impl Layers<'_> {
    /// One top-level setting and where it came from: the flag wins, then
    /// the variable, then the file.
    fn get<T>(
        &self,
        setting: Setting,
        flag: Option<&String>,
        file: Option<Spanned<Text<T>>>,
        parse: fn(&str) -> Result<T, String>,
    ) -> Result<Option<(T, Origin)>, ConfigError> {
        let given = match flag {
            Some(value) => Some((value.clone(), Origin::Flag(setting.flag))),
            None => (self.env)(setting.var)
                .filter(|v| !v.trim().is_empty())
                .map(|v| (v.trim().to_owned(), Origin::Env(setting.var))),
        };
        let Some((value, origin)) = given else {
            return Ok(file.map(|v| {
                let span = v.span();
                (v.into_inner().0, Origin::File(span))
            }));
        };
        match parse(&value) {
            Ok(v) => Ok(Some((v, origin))),
            Err(reason) => Err(origin.error(self.src, reason)),
        }
    }
}

fn build(
    src: &Src<'_>,
    file: FileConfig,
    source: Option<PathBuf>,
    env: &dyn Fn(&str) -> Option<String>,
    flags: &Overrides,
) -> Result<Config, ConfigError> {
    let (limits, store_timeout_span) = file.limits.unwrap_or_default().into_limits(src)?;
    let store_timeout = file::StoreTimeout {
        value: limits.store_timeout,
        span: store_timeout_span,
    };
    let routes = file::route_table(src, file.defaults, file.route, &store_timeout)?;

    let layers = Layers { src, env };
    let (listen, listen_origin) = layers
        .get(LISTEN, flags.listen.as_ref(), file.listen, parse::addr)?
        .unwrap_or((DEFAULT_LISTEN, Origin::Default));
    let (upstream, upstream_origin) = layers
        .get(
            UPSTREAM,
            flags.upstream.as_ref(),
            file.upstream,
            parse::upstream,
        )?
        .ok_or(ConfigError::MissingUpstream)?;
    let (store, store_origin) = layers
        .get(STORE, flags.store.as_ref(), file.store, parse::store)?
        .unwrap_or((StoreSpec::Memory, Origin::Default));
    let admin = layers.get(
        ADMIN_LISTEN,
        flags.admin_listen.as_ref(),
        file.admin_listen,
        parse::addr,
    )?;
    let admin_token = admin_token(env)?;
    let tls = {
        let dir = source.as_deref().and_then(Path::parent);
        let path = |setting, flag: Option<&String>, file| {
            layers
                .get(setting, flag, file, parse::path)
                .map(|got| got.map(|(p, origin)| relative_to_file(p, &origin, dir)))
        };
        super::TlsFiles {
            cert: path(TLS_CERT, flags.tls_cert.as_ref(), file.tls_cert)?,
            key: path(TLS_KEY, flags.tls_key.as_ref(), file.tls_key)?,
            upstream_ca: path(UPSTREAM_CA, flags.upstream_ca.as_ref(), file.upstream_ca)?,
            store_ca: path(STORE_CA, flags.store_ca.as_ref(), file.store_ca)?,
        }
    };
    if let Some(reason) = super::half_a_pair(&tls) {
        return Err(ConfigError::File {
            file: src.name.to_owned(),
            line: None,
            reason,
        });
    }

    // Checks that need more than one value.
    if let Some((admin, origin)) = &admin {
        if *admin == listen && listen.port() != 0 {
            return Err(origin.error(
                src,
                format!(
                    "admin_listen {admin} is also the gateway's listen address \
                     (from {}); give the admin listener its own port",
                    listen_origin.describe()
                ),
            ));
        }
        if admin_token.is_none() {
            return Err(origin.error(
                src,
                format!(
                    "admin_listen {admin} needs a bearer token: set IDEM_ADMIN_TOKEN \
                     (the admin listener can read and purge records)"
                ),
            ));
        }
    }
    if listen.port() != 0 && upstream_is(&upstream, listen) {
        return Err(upstream_origin.error(
            src,
            format!(
                "upstream {upstream} is the gateway's own listen address \
                 (from {}): every request would loop back into idem",
                listen_origin.describe()
            ),
        ));
    }

    let config = Config {
        listen,
        upstream,
        store,
        admin_listen: admin.map(|(a, _)| a),
        admin_token,
        routes,
        limits,
        tls,
        source,
    };
    if config.accepts_what_nothing_dispatches() {
        return Err(store_origin.error(src, super::ACCEPT_ONLY_ON_MEMORY.to_owned()));
    }
    Ok(config)
}

/// A path from the file is relative to the file's directory; from a flag
/// or a variable, to the working directory.
fn relative_to_file(path: PathBuf, origin: &Origin, dir: Option<&Path>) -> PathBuf {
    match (origin, dir) {
        (Origin::File(_), Some(dir)) if path.is_relative() && !dir.as_os_str().is_empty() => {
            dir.join(path)
        }
        _ => path,
    }
}

/// `IDEM_ADMIN_TOKEN` (never the file, never a flag).
fn admin_token(env: &dyn Fn(&str) -> Option<String>) -> Result<Option<String>, ConfigError> {
    let Some(token) = env("IDEM_ADMIN_TOKEN").filter(|t| !t.is_empty()) else {
        return Ok(None);
    };
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ConfigError::Env {
            var: "IDEM_ADMIN_TOKEN",
            reason: "the token must be visible ASCII characters only \
                     (no spaces or line breaks): it is compared with \
                     `Authorization: Bearer <token>`"
                .to_owned(),
        });
    }
    if let Some(reason) = super::token_too_short(&token) {
        return Err(ConfigError::Env {
            var: "IDEM_ADMIN_TOKEN",
            reason,
        });
    }
    Ok(Some(token))
}

/// Whether `upstream` names exactly `addr` (an IP literal and the same port).
fn upstream_is(upstream: &Uri, addr: SocketAddr) -> bool {
    let Some(host) = upstream.host() else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = upstream.port_u16().unwrap_or(80);
    host.parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip == addr.ip() && port == addr.port())
}

// ---------------------------------------------------------------------------
// Source positions

/// The file being read: its name for messages and its text for line numbers.
pub(super) struct Src<'a> {
    name: &'a str,
    text: &'a str,
}

impl Src<'_> {
    fn parse(&self) -> Result<FileConfig, ConfigError> {
        toml::from_str(self.text).map_err(|e| self.toml_error(&e))
    }

    /// 1-based line of a byte offset.
    pub(super) fn line(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    /// A problem with the value or key at `span`.
    pub(super) fn at(&self, span: &Range<usize>, reason: impl Into<String>) -> ConfigError {
        ConfigError::File {
            file: self.name.to_owned(),
            line: Some(self.line(span.start)),
            reason: reason.into(),
        }
    }

    /// toml's error, on one line, prefixed by the key whose value is at fault
    /// and followed by a suggestion for a misspelt key.
    fn toml_error(&self, e: &toml::de::Error) -> ConfigError {
        let mut reason = e
            .message()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(": ")
            .replace("unknown variant", "unknown value");
        if let Some(suggestion) = did_you_mean(&reason) {
            reason = format!("{reason} (did you mean `{suggestion}`?)");
        }
        let Some(span) = e.span() else {
            return ConfigError::File {
                file: self.name.to_owned(),
                line: None,
                reason,
            };
        };
        if let Some(key) = self.key_before(span.start) {
            reason = format!("{key}: {reason}");
        }
        // `[route]` where `[[route]]` was meant.
        let header = self.text.get(span.start..).and_then(|t| t.lines().next());
        if let Some(name) = header
            .and_then(|h| h.trim().strip_prefix('['))
            .filter(|h| !h.starts_with('['))
            .and_then(|h| h.split_once(']'))
            .map(|(name, _)| name.trim())
        {
            if reason.contains("expected a sequence") {
                reason = format!(
                    "[{name}] must be written [[{name}]], with double brackets: \
                     it is a list (one [[{name}]] per entry)"
                );
            }
        }
        self.at(&span, reason)
    }

    /// The key of the `key = value` whose value starts at `offset`, if any.
    fn key_before(&self, offset: usize) -> Option<&str> {
        let before = self.text.get(..offset)?;
        let before = before.trim_end_matches([' ', '\t']).strip_suffix('=')?;
        let before = before.trim_end_matches([' ', '\t']);
        let is_key = |c: char| c.is_ascii_alphanumeric() || "_-.\"'".contains(c);
        let start = before
            .char_indices()
            .rev()
            .take_while(|(_, c)| is_key(*c))
            .last()?
            .0;
        Some(before[start..].trim_matches(['"', '\'']))
    }
}

/// For "unknown field `x`, expected one of `a`, `b`": the closest expected
/// name, if it is close enough to be a typo.
fn did_you_mean(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("unknown field `")?;
    let (unknown, rest) = rest.split_once('`')?;
    let (_, expected) = rest.split_once("expected")?;
    expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|c| (edit_distance(unknown, c), c))
        .filter(|(d, c)| *d <= 2 && *d * 3 <= c.len())
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let subst = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = subst.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use crate::config::tests::{assert_err, load_err};

    #[test]
    fn bad_top_level_values() {
        assert_err(
            "listen = \"localhost:8080\"\n",
            2,
            &["listen", "`localhost:8080`"],
        );
        assert_err(
            "store = \"mysql://u:hunter2@db/x\"\n",
            2,
            &["memory", "redis://", "postgres://"],
        );
        assert!(!load_err("store = \"mysql://u:hunter2@db/x\"\n").contains("hunter2"));
        assert_err("store = \"redis://\"\n", 2, &["no host"]);
        assert_err(
            "upstream = \"ftp://api.example\"\n",
            1,
            &["scheme `ftp` is not supported"],
        );
        assert_err("tls_cert = \"\"\n", 2, &["tls_cert", "the path is empty"]);
        assert_err("upstream = \"http://127.0.0.1:3000/api\"\n", 1, &["path"]);
        assert_err("upstream = \"http://127.0.0.1:3000/?a=1\"\n", 1, &["query"]);
        assert_err(
            "upstream = \"127.0.0.1:3000\"\n",
            1,
            &["http://127.0.0.1:3000"],
        );
        assert_err("upstream = \"ftp://x\"\n", 1, &["`ftp`"]);
        assert_err("upstream = \"http://u:p@x\"\n", 1, &["credentials"]);
        assert_err(
            "admin_token = \"s3cret\"\n",
            2,
            &["admin_token", "IDEM_ADMIN_TOKEN"],
        );
        assert!(!load_err("admin_token = \"s3cret\"\n").contains("s3cret"));
        assert_err("listen = 8080\n", 2, &["listen", "string"]);
        assert_err(
            "listen = \"127.0.0.1:1\"\nlisten = \"127.0.0.1:2\"\n",
            3,
            &["duplicate key"],
        );
        assert_err("listen = \n", 2, &["listen"]);
        assert_err(
            "listen = \"127.0.0.1:9000\"\nadmin_listen = \"127.0.0.1:9000\"\n",
            3,
            &["admin_listen", "own port"],
        );
        assert_err("listen = \"127.0.0.1:3000\"\n", 1, &["loop"]);
    }
}

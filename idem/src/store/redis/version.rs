//! The stale-event guard on Redis (protocol §13): one hash per scoped
//! entity at `{prefix}v:{<store key>}`, the store key as the hash tag (so
//! an entity lives in one Cluster slot, like a record), with the fields
//! `version` (the highest completed, [`Version::encoded`]), `token` and
//! `until` (the holder, and the end of its lease in ms on Redis's clock).
//!
//! Every step is ONE Lua script (`lua/version_*.lua`, each with its
//! `-- Atomicity:` note); reading the version is one `HGET`. The key has no
//! TTL: a version lives as long as Redis keeps its data. Scripts are
//! loaded once per process, apart from the store's own [`Scripts`](super).

use std::sync::LazyLock;
use std::time::Duration;

use ::redis::{cmd, Script, Value};

use super::invoke::{token_hex, Invocation};
use super::reply::{ttl_ms, Reply};
use super::RedisStore;
use crate::key::StoreKey;
use crate::record::Token;
use crate::store::{Fence, Lease, StoreError, VersionBegin, VersionStore};
use crate::version::Version;

static BEGIN: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/version_begin.lua")));
static COMMIT: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/version_commit.lua")));
static ABORT: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/version_abort.lua")));
static EXTEND: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/version_extend.lua")));

impl RedisStore {
    /// The Redis key of `entity`'s version: `{prefix}v:{<store key>}`.
    #[must_use]
    pub fn version_key(&self, entity: &StoreKey) -> String {
        format!("{}v:{{{}}}", self.inner.prefix, entity.as_str())
    }

    async fn version_fenced(
        &self,
        script: &Script,
        entity: &StoreKey,
        arg: String,
        token: Token,
    ) -> Result<Fence, StoreError> {
        let mut inv = Invocation::new(script, 1);
        inv.key(self.version_key(entity))
            .arg(token_hex(token))
            .arg(arg);
        match self.eval(inv).await? {
            Value::Int(1) => Ok(Fence::Held),
            Value::Int(0) => Ok(Fence::Lost),
            other => Err(StoreError::Corrupt(
                format!("unexpected reply {other:?} from a version script").into(),
            )),
        }
    }
}

fn stored(text: &str) -> Result<Version, StoreError> {
    Version::from_encoded(text)
        .map_err(|_| StoreError::Corrupt(format!("stored version {text:?}").into()))
}

impl VersionStore for RedisStore {
    async fn begin_version(
        &self,
        entity: &StoreKey,
        version: Version,
        lease: Duration,
    ) -> Result<VersionBegin, StoreError> {
        let token = Token::generate();
        let mut inv = Invocation::new(&BEGIN, 1);
        inv.key(self.version_key(entity))
            .arg(version.encoded())
            .arg(token_hex(token))
            .arg(ttl_ms(lease));
        let mut reply = Reply::new(self.eval(inv).await?)?;
        match reply.tag()?.as_str() {
            "acquired" => Ok(VersionBegin::Acquired(Lease {
                token,
                duration: lease,
            })),
            "stale" => Ok(VersionBegin::Stale {
                current: stored(&reply.text("version")?)?,
            }),
            "mixed" => Ok(VersionBegin::Mixed {
                current: stored(&reply.text("version")?)?,
            }),
            "busy" => Ok(VersionBegin::InFlight {
                lease_remaining: Duration::from_millis(reply.number("lease remaining")?),
            }),
            other => Err(StoreError::Corrupt(
                format!("version_begin: unknown reply {other:?}").into(),
            )),
        }
    }

    async fn commit_version(
        &self,
        entity: &StoreKey,
        token: Token,
        version: Version,
    ) -> Result<Fence, StoreError> {
        self.version_fenced(&COMMIT, entity, version.encoded(), token)
            .await
    }

    async fn abort_version(&self, entity: &StoreKey, token: Token) -> Result<Fence, StoreError> {
        self.version_fenced(&ABORT, entity, String::new(), token)
            .await
    }

    async fn extend_version(
        &self,
        entity: &StoreKey,
        token: Token,
        lease: Duration,
    ) -> Result<Fence, StoreError> {
        self.version_fenced(&EXTEND, entity, ttl_ms(lease).to_string(), token)
            .await
    }

    async fn current_version(&self, entity: &StoreKey) -> Result<Option<Version>, StoreError> {
        let mut c = cmd("HGET");
        c.arg(self.version_key(entity)).arg("version");
        match self.query(c).await? {
            Value::Nil => Ok(None),
            Value::BulkString(b) => {
                let text = String::from_utf8(b)
                    .map_err(|_| StoreError::Corrupt("stored version: not UTF-8".into()))?;
                stored(&text).map(Some)
            }
            other => Err(StoreError::Corrupt(
                format!("unexpected reply {other:?} to HGET version").into(),
            )),
        }
    }
}

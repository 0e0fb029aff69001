//! The Redis store's job traces (protocol §13, `store/job.rs`).
//!
//! A job's trace is a small hash at `{prefix}{<store key>}:job`, under the
//! record's hash tag (so in the record's Cluster slot), beside the record
//! and never inside it: `reserve` and `complete` (the HTTP hot path) do not
//! read or write it, and it outlives a `release`, which deletes the record.
//! Its TTL is the retention, renewed by every step.
//!
//! | field | meaning |
//! |---|---|
//! | `attempts` | runs of the job's closure so far, decimal |
//! | `running` | `1` from a run's start until it ends, else `0` |
//! | `last_error` | the last ended run's failure text, if any |
//!
//! `begin_attempt` and `end_attempt` are ONE script each
//! (`lua/job_begin.lua`, `lua/job_end.lua`); reading is one `HMGET`.

use std::time::Duration;

use ::redis::{Script, Value};

use super::invoke::{Invocation, Tagged};
use super::reply::ttl_ms;
use super::RedisStore;
use crate::key::StoreKey;
use crate::store::{Attempts, Fence, StoreError};

pub(super) struct Scripts {
    begin: Script,
    end: Script,
}

impl Scripts {
    pub(super) fn load() -> Self {
        Self {
            begin: Script::new(include_str!("lua/job_begin.lua")),
            end: Script::new(include_str!("lua/job_end.lua")),
        }
    }
}

impl RedisStore {
    /// The Redis key of `key`'s job trace: `{prefix}{<store key>}:job`.
    #[must_use]
    pub fn job_key(&self, key: &StoreKey) -> String {
        let mut k = self.record_key(key);
        k.push_str(":job");
        k
    }

    /// `key`'s job key as a call argument, written in place.
    pub(super) fn job_arg<'a>(&'a self, key: &'a StoreKey) -> Tagged<'a> {
        Tagged {
            prefix: self.prefix(),
            tag: key.as_str(),
            suffix: ":job",
        }
    }

    pub(super) async fn job_begin(
        &self,
        key: &StoreKey,
        keep: Duration,
    ) -> Result<u32, StoreError> {
        let mut inv = Invocation::new(&self.inner.scripts.job.begin, 1);
        inv.key(self.job_arg(key)).arg(ttl_ms(keep));
        match self.eval(inv).await? {
            Value::Int(n) => u32::try_from(n).map_err(|_| corrupt("attempts out of range")),
            other => Err(corrupt(&format!(
                "unexpected reply {other:?} from job_begin"
            ))),
        }
    }

    pub(super) async fn job_end(
        &self,
        key: &StoreKey,
        attempt: u32,
        error: Option<&str>,
        keep: Duration,
    ) -> Result<Fence, StoreError> {
        let mut inv = Invocation::new(&self.inner.scripts.job.end, 1);
        inv.key(self.job_arg(key)).arg(attempt).arg(ttl_ms(keep));
        if let Some(e) = error {
            inv.arg(e);
        }
        match self.eval(inv).await? {
            Value::Int(1) => Ok(Fence::Held),
            Value::Int(0) => Ok(Fence::Lost),
            other => Err(corrupt(&format!("unexpected reply {other:?} from job_end"))),
        }
    }

    pub(super) async fn job_get(&self, key: &StoreKey) -> Result<Option<Attempts>, StoreError> {
        let mut cmd = ::redis::cmd("HMGET");
        cmd.arg(self.job_key(key))
            .arg("attempts")
            .arg("running")
            .arg("last_error");
        let Value::Array(fields) = self.query(cmd).await? else {
            return Err(corrupt("HMGET answered something other than an array"));
        };
        let text = |v: Option<&Value>| -> Result<Option<String>, StoreError> {
            match v {
                None | Some(Value::Nil) => Ok(None),
                Some(Value::BulkString(b)) => String::from_utf8(b.clone())
                    .map(Some)
                    .map_err(|_| corrupt("a field is not UTF-8")),
                Some(other) => Err(corrupt(&format!("unexpected field {other:?}"))),
            }
        };
        let Some(count) = text(fields.first())? else {
            return Ok(None);
        };
        Ok(Some(Attempts {
            count: count
                .parse()
                .map_err(|_| corrupt("attempts is not a number"))?,
            running: text(fields.get(1))?.as_deref() == Some("1"),
            last_error: text(fields.get(2))?,
        }))
    }
}

fn corrupt(why: &str) -> StoreError {
    StoreError::Corrupt(format!("job trace: {why}").into())
}

//! Redis: the connection, the stream and its consumer group, what the operator caps, trims and
//! expires, and TLS (for the operator and for the runner pods).

use std::fmt;

use repobox_contract::keys;

use super::{invalid, non_empty, secret_ref};
use crate::error::Result;

/// The default dead-letter stream for entries that exceeded `MAX_DELIVERIES`.
pub const DEFAULT_DEAD_LETTER_STREAM: &str = "jobs:stream:dead";

/// The Redis URL, whose `Debug` and `Display` mask the password (it is printed in start-up logs).
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl(String);

impl RedisUrl {
    /// The URL with its password, for connecting. Never log this.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with the password (or a password-only userinfo) replaced by `****`.
    pub fn masked(&self) -> String {
        repobox_contract::urls::mask_password(self.0.as_str())
    }
}

impl From<String> for RedisUrl {
    fn from(s: String) -> Self {
        RedisUrl(s)
    }
}

impl std::str::FromStr for RedisUrl {
    type Err = std::convert::Infallible;

    /// Never fails: validation happens in [`Config::validate`](super::Config::validate), whose error does not echo the
    /// value (clap's would, password included).
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Ok(RedisUrl(s.to_owned()))
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.masked())
    }
}

impl fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.masked())
    }
}

/// The Redis settings (help heading "Redis").
#[derive(clap::Args, Clone, Debug, PartialEq)]
pub struct RedisSettings {
    /// Redis connection URL (`redis://[user:password@]host:port[/db]`, `rediss://…`).
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: RedisUrl,

    /// The stream the web app adds jobs to.
    #[arg(long, env = "STREAM_KEY", default_value = keys::JOBS_STREAM)]
    pub stream_key: String,

    /// The runners' consumer group (created if missing).
    #[arg(long, env = "CONSUMER_GROUP", default_value = keys::CONSUMER_GROUP)]
    pub consumer_group: String,

    /// Where entries go after `MAX_DELIVERIES` failed deliveries.
    #[arg(long, env = "DEAD_LETTER_STREAM", default_value = DEFAULT_DEAD_LETTER_STREAM)]
    pub dead_letter_stream: String,

    /// How often an entry may be delivered before it is dead-lettered.
    #[arg(long, env = "MAX_DELIVERIES", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_deliveries: u32,

    /// Pending entries idle this long (another instance died holding them) are claimed.
    #[arg(long, env = "CLAIM_MIN_IDLE_SECONDS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub claim_min_idle_seconds: u64,

    // ----- Redis retention: what the operator caps, trims and expires -----
    /// Approximate cap of the dead-letter stream (`XADD … MAXLEN ~`).
    #[arg(long, env = "DEAD_LETTER_MAXLEN", default_value_t = 10000, value_parser = clap::value_parser!(u64).range(1..))]
    pub dead_letter_maxlen: u64,

    /// Expiry of `job:{id}:output` once the job is terminal, in seconds (0 keeps it forever).
    #[arg(long, env = "OUTPUT_TTL_SECONDS", default_value_t = 604800)]
    pub output_ttl_seconds: u32,

    // ----- Redis TLS -----
    /// A PEM CA bundle the operator trusts for `rediss://` instead of the system roots (a Redis
    /// with a private CA).
    #[arg(long, env = "REDIS_CA_FILE")]
    pub redis_ca_file: Option<std::path::PathBuf>,

    /// The Secret (in the jobs namespace) whose key `REDIS_CA_SECRET_KEY` runner pods mount as
    /// their Redis CA; unset: runners trust the system roots.
    #[arg(long, env = "REDIS_CA_SECRET_NAME")]
    pub redis_ca_secret_name: Option<String>,

    /// The key of the CA certificate in `REDIS_CA_SECRET_NAME`.
    #[arg(long, env = "REDIS_CA_SECRET_KEY", default_value = "ca.crt")]
    pub redis_ca_secret_key: String,
}

impl RedisSettings {
    /// The Redis TLS settings: a CA file only makes sense for a TLS URL; the runner CA Secret
    /// must be a valid name and key.
    pub(super) fn validate_tls(&self) -> Result<()> {
        if self.redis_ca_file.is_some() {
            let scheme = self.redis_url.expose().split_once("://").map(|(s, _)| s);
            if !matches!(scheme, Some("rediss" | "valkeys")) {
                return Err(invalid(
                    "REDIS_CA_FILE",
                    "is only used with a TLS URL (rediss://) in REDIS_URL",
                ));
            }
        }
        if let Some(name) = non_empty(&self.redis_ca_secret_name) {
            secret_ref(
                ("REDIS_CA_SECRET_NAME", name),
                ("REDIS_CA_SECRET_KEY", &self.redis_ca_secret_key),
            )?;
        }
        Ok(())
    }
}

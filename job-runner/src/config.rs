//! The executor's settings, all from the environment: the names and defaults are
//! `repobox_contract::runner_env`, which the operator's Job builder writes through too.
//!
//! A missing or malformed setting is an error that names the setting and never echoes
//! a secret value; the process then exits before touching the job.

use std::path::PathBuf;
use std::time::Duration;

use repobox_contract::runner_env as env;
use repobox_contract::{EncryptionKey, Masker, events};

/// One definition for both binaries (`repobox_process`).
pub use repobox_process::LogFormat;

/// A setting that could not be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("configuration error: {setting} {problem}")]
pub struct ConfigError {
    /// The environment variable's name.
    pub setting: &'static str,
    /// What is wrong with it (never the value of a secret).
    pub problem: String,
}

fn err(setting: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        setting,
        problem: problem.into(),
    }
}

/// How output lines are shipped to `job:{id}:output` and `job:{id}:events`. The batch
/// settings may only be lowered from the event contract's bounds (`events::MAX_BATCH_*`):
/// subscribers rely on them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputConfig {
    /// Flush after this many lines...
    pub flush_lines: usize,
    /// ...or before the batch's lines would take more than this many bytes as JSON...
    pub flush_bytes: usize,
    /// ...or this long after the first unflushed line, whichever comes first.
    pub flush_interval: Duration,
    /// Total bytes pushed for one job; one truncation line follows when reached.
    pub max_bytes: usize,
}

impl Default for OutputConfig {
    fn default() -> Self {
        Self {
            flush_lines: events::MAX_BATCH_LINES,
            flush_bytes: events::MAX_BATCH_BYTES,
            flush_interval: events::MAX_BATCH_DELAY,
            max_bytes: env::DEFAULT_OUTPUT_MAX_BYTES,
        }
    }
}

/// The smallest `OUTPUT_FLUSH_BYTES`: a batch always has room for a line piece.
const MIN_FLUSH_BYTES: usize = 1024;

/// A number setting that must lie in `min..=max`.
fn bounded<T: std::str::FromStr + PartialOrd + std::fmt::Display>(
    setting: &'static str,
    v: &str,
    min: T,
    max: T,
) -> Result<T, ConfigError> {
    let n: T = parse_num(setting, v)?;
    if n < min || n > max {
        return Err(err(
            setting,
            format!("must be between {min} and {max} (the live event bounds), not `{n}`"),
        ));
    }
    Ok(n)
}

/// Everything the runner reads from its environment ([`Config::from_env`]). `Debug` hides the
/// Redis password and the encryption key.
#[derive(Clone)]
pub struct Config {
    /// `JOB_ID`: the job to run (`job:{jobId}`).
    pub job_id: String,
    /// May hold a password: never log it (see the `Debug` impl).
    pub redis_url: String,
    /// From `ENCRYPTION_KEY_FILE` or `ENCRYPTION_KEY`: decrypts the provider's token.
    pub encryption_key: EncryptionKey,
    /// `RUNNER_ID` (else `HOSTNAME`, the pod name): written as the job's `runnerId`.
    pub runner_id: String,
    /// Which attempt at the job this runner is (`JOB_ATTEMPT`, from 1).
    pub attempt: u32,
    /// `TEMP_DIR`: the work volume; the tree and the hand-off directory go below it.
    pub temp_dir: PathBuf,
    /// `CLEANUP_AFTER_JOB`: remove the job's directories when done.
    pub cleanup_after_job: bool,
    /// `GIT_AUTHOR_NAME`: the author and committer of the agent's commit.
    pub git_author_name: String,
    /// `GIT_AUTHOR_EMAIL`: their e-mail.
    pub git_author_email: String,
    /// `0` means a full clone.
    pub clone_depth: u32,
    /// Run by the runner itself through a local agent wrapper process (development and
    /// tests); in a pod the agent runs in its own container instead (`agent_container`).
    pub agent_command: Option<String>,
    /// Names of extra environment variables handed to a local agent (e.g. its API key).
    pub agent_env: Vec<String>,
    /// The agent runs in a sibling container (the `agent` container of the Job's pod): the
    /// runner hands the checkout over through `{temp_dir}/handoff` instead of starting it.
    pub agent_container: bool,
    /// How long the agent may take to pick up the checkout (its image may still be pulling).
    pub agent_start_timeout: Duration,
    /// Runner-only scratch space: the git directory and the commit message live here, out
    /// of the agent's reach (a volume only the runner container mounts).
    pub private_dir: PathBuf,
    /// A CA bundle for the git host (`GIT_SSL_CAINFO`), e.g. an in-cluster host's private CA.
    pub git_ca_file: Option<PathBuf>,
    /// The CA (PEM) a `rediss://` Redis is verified with (`REDIS_CA_FILE`), instead of the
    /// system roots.
    pub redis_ca_file: Option<PathBuf>,
    /// `OUTPUT_*`: how output lines are batched and capped.
    pub output: OutputConfig,
    /// Allows `http://` repository URLs (tests, air-gapped mirrors); the token then
    /// crosses the network in clear, so it is off by default.
    pub allow_insecure_http: bool,
    /// Open (or find) a pull / merge request after a push (`OPEN_PULL_REQUESTS`); a job can
    /// only turn it off (`openPullRequest=false`).
    pub open_pull_requests: bool,
    /// `LOG_FORMAT`: `json` or `text`.
    pub log_format: LogFormat,
    /// How long a stopped git/agent child gets between SIGTERM and SIGKILL.
    pub kill_grace: Duration,
    /// `GIT_BIN`: the git executable (looked up on `PATH` unless a path).
    pub git_bin: PathBuf,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("job_id", &self.job_id)
            .field("redis_url", &Masker::new().mask(&self.redis_url))
            .field("encryption_key", &self.encryption_key)
            .field("runner_id", &self.runner_id)
            .field("attempt", &self.attempt)
            .field("temp_dir", &self.temp_dir)
            .field("cleanup_after_job", &self.cleanup_after_job)
            .field("clone_depth", &self.clone_depth)
            .field("agent_command", &self.agent_command.is_some())
            .field("agent_container", &self.agent_container)
            .field("open_pull_requests", &self.open_pull_requests)
            .field("output", &self.output)
            .finish_non_exhaustive()
    }
}

fn parse_bool(setting: &'static str, v: &str) -> Result<bool, ConfigError> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        other => Err(err(
            setting,
            format!("must be true or false, not `{other}`"),
        )),
    }
}

fn parse_num<T: std::str::FromStr>(setting: &'static str, v: &str) -> Result<T, ConfigError> {
    v.trim().parse().map_err(|_| {
        err(
            setting,
            format!("must be a non-negative integer, not `{v}`"),
        )
    })
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads settings through `get` (the environment in production, a map in tests).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get = |name: &str| get(name).filter(|v| !v.trim().is_empty());

        let job_id = get(env::JOB_ID).ok_or_else(|| err(env::JOB_ID, "is required"))?;
        let redis_url = get(env::REDIS_URL).ok_or_else(|| err(env::REDIS_URL, "is required"))?;
        let redis_url = redis_url.trim().to_owned();
        repobox_contract::urls::check_redis_url(&redis_url)
            .map_err(|e| err(env::REDIS_URL, e.to_string()))?;

        let encryption_key = match (get(env::ENCRYPTION_KEY_FILE), get(env::ENCRYPTION_KEY)) {
            (Some(_), Some(_)) => {
                return Err(err(
                    env::ENCRYPTION_KEY,
                    format!(
                        "and {} are both set; set only one",
                        env::ENCRYPTION_KEY_FILE
                    ),
                ));
            }
            (Some(path), None) => {
                let text = std::fs::read_to_string(path.trim()).map_err(|e| {
                    err(
                        env::ENCRYPTION_KEY_FILE,
                        format!("cannot be read ({}): {e}", path.trim()),
                    )
                })?;
                EncryptionKey::parse(&text)
                    .map_err(|e| err(env::ENCRYPTION_KEY_FILE, format!("content {e}")))?
            }
            (None, Some(v)) => {
                EncryptionKey::parse(&v).map_err(|e| err(env::ENCRYPTION_KEY, e.to_string()))?
            }
            (None, None) => {
                return Err(err(
                    env::ENCRYPTION_KEY,
                    format!(
                        "is required (or {} with the path of a file holding it)",
                        env::ENCRYPTION_KEY_FILE
                    ),
                ));
            }
        };

        let max_ms = events::MAX_BATCH_DELAY.as_millis() as u64;
        let output = OutputConfig {
            flush_lines: match get(env::OUTPUT_FLUSH_LINES) {
                // 0 would never flush: it means 1.
                Some(v) => bounded(env::OUTPUT_FLUSH_LINES, &v, 0, events::MAX_BATCH_LINES)?.max(1),
                None => OutputConfig::default().flush_lines,
            },
            flush_bytes: match get(env::OUTPUT_FLUSH_BYTES) {
                Some(v) => bounded(
                    env::OUTPUT_FLUSH_BYTES,
                    &v,
                    MIN_FLUSH_BYTES,
                    events::MAX_BATCH_BYTES,
                )?,
                None => OutputConfig::default().flush_bytes,
            },
            flush_interval: match get(env::OUTPUT_FLUSH_MS) {
                Some(v) => Duration::from_millis(bounded(env::OUTPUT_FLUSH_MS, &v, 0, max_ms)?),
                None => OutputConfig::default().flush_interval,
            },
            max_bytes: match get(env::OUTPUT_MAX_BYTES) {
                Some(v) => parse_num(env::OUTPUT_MAX_BYTES, &v)?,
                None => OutputConfig::default().max_bytes,
            },
        };

        let temp_dir = get(env::TEMP_DIR)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env::DEFAULT_TEMP_DIR));
        Ok(Self {
            job_id: job_id.trim().to_owned(),
            redis_url,
            encryption_key,
            runner_id: get(env::RUNNER_ID)
                .or_else(|| get(env::HOSTNAME))
                .unwrap_or_else(|| env::DEFAULT_RUNNER_ID.to_owned()),
            attempt: match get(env::JOB_ATTEMPT) {
                Some(v) => match parse_num::<u32>(env::JOB_ATTEMPT, &v)? {
                    0 => return Err(err(env::JOB_ATTEMPT, "must be 1 or more")),
                    n => n,
                },
                None => env::DEFAULT_JOB_ATTEMPT,
            },
            private_dir: get(env::PRIVATE_DIR)
                .map(PathBuf::from)
                .unwrap_or_else(|| temp_dir.clone()),
            temp_dir,
            agent_container: match get(env::AGENT_CONTAINER) {
                Some(v) => parse_bool(env::AGENT_CONTAINER, &v)?,
                None => false,
            },
            agent_start_timeout: Duration::from_secs(match get(env::AGENT_START_TIMEOUT_SECONDS) {
                Some(v) => parse_num(env::AGENT_START_TIMEOUT_SECONDS, &v)?,
                None => env::DEFAULT_AGENT_START_TIMEOUT_SECONDS,
            }),
            git_ca_file: get(env::GIT_SSL_CAINFO).map(PathBuf::from),
            redis_ca_file: get(env::REDIS_CA_FILE).map(PathBuf::from),
            cleanup_after_job: match get(env::CLEANUP_AFTER_JOB) {
                Some(v) => parse_bool(env::CLEANUP_AFTER_JOB, &v)?,
                None => env::DEFAULT_CLEANUP_AFTER_JOB,
            },
            git_author_name: get(env::GIT_AUTHOR_NAME)
                .unwrap_or_else(|| env::DEFAULT_GIT_AUTHOR_NAME.to_owned()),
            git_author_email: get(env::GIT_AUTHOR_EMAIL)
                .unwrap_or_else(|| env::DEFAULT_GIT_AUTHOR_EMAIL.to_owned()),
            clone_depth: match get(env::GIT_CLONE_DEPTH) {
                Some(v) => parse_num(env::GIT_CLONE_DEPTH, &v)?,
                None => env::DEFAULT_GIT_CLONE_DEPTH,
            },
            agent_command: get(env::AGENT_COMMAND),
            agent_env: get(env::AGENT_ENV)
                .map(|v| {
                    v.split(',')
                        .map(|s| s.trim().to_owned())
                        .filter(|s| !s.is_empty())
                        .collect()
                })
                .unwrap_or_default(),
            output,
            allow_insecure_http: match get(env::ALLOW_INSECURE_HTTP) {
                Some(v) => parse_bool(env::ALLOW_INSECURE_HTTP, &v)?,
                None => env::DEFAULT_ALLOW_INSECURE_HTTP,
            },
            open_pull_requests: match get(env::OPEN_PULL_REQUESTS) {
                Some(v) => parse_bool(env::OPEN_PULL_REQUESTS, &v)?,
                None => env::DEFAULT_OPEN_PULL_REQUESTS,
            },
            log_format: match get(env::LOG_FORMAT).as_deref().map(str::trim) {
                None => LogFormat::default(),
                Some(name) => LogFormat::from_name(name).ok_or_else(|| {
                    err(
                        env::LOG_FORMAT,
                        format!("must be json or text, not `{name}`"),
                    )
                })?,
            },
            kill_grace: Duration::from_secs(match get(env::KILL_GRACE_SECONDS) {
                Some(v) => parse_num(env::KILL_GRACE_SECONDS, &v)?,
                None => env::DEFAULT_KILL_GRACE_SECONDS,
            }),
            git_bin: get(env::GIT_BIN)
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(env::DEFAULT_GIT_BIN)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const HEX: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    fn cfg(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|k| map.get(k).cloned())
    }

    fn base() -> Vec<(&'static str, &'static str)> {
        vec![
            ("JOB_ID", "job-1"),
            ("REDIS_URL", "redis://:pw@127.0.0.1:6379/0"),
            ("ENCRYPTION_KEY", HEX),
        ]
    }

    #[test]
    fn defaults() {
        let c = cfg(&base()).unwrap();
        assert_eq!(c.job_id, "job-1");
        assert_eq!(c.runner_id, "runner-1");
        assert_eq!(c.temp_dir, PathBuf::from("/tmp/repobox"));
        assert!(c.cleanup_after_job);
        assert_eq!(c.clone_depth, 1);
        assert_eq!(c.agent_command, None);
        assert_eq!(c.output, OutputConfig::default());
        // The event contract's bounds: 50 lines, 256 KiB, 2 s.
        assert_eq!(c.output.flush_lines, 50);
        assert_eq!(c.output.flush_bytes, 256 * 1024);
        assert_eq!(c.output.flush_interval, Duration::from_secs(2));
        assert!(!c.allow_insecure_http);
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.kill_grace, Duration::from_secs(5));
        assert!(!c.agent_container);
        assert_eq!(
            c.private_dir, c.temp_dir,
            "private files beside the work tree locally"
        );
        assert_eq!(c.agent_start_timeout, Duration::from_secs(600));
        assert_eq!(c.git_ca_file, None);
        assert!(c.open_pull_requests);
    }

    #[test]
    fn overrides() {
        let mut p = base();
        p.extend([
            ("RUNNER_ID", "pod-abc"),
            ("TEMP_DIR", "/work"),
            ("CLEANUP_AFTER_JOB", "false"),
            ("GIT_AUTHOR_NAME", "Bot"),
            ("GIT_AUTHOR_EMAIL", "bot@x"),
            ("GIT_CLONE_DEPTH", "0"),
            ("AGENT_COMMAND", "echo hi"),
            ("AGENT_ENV", "ANTHROPIC_API_KEY, OTHER"),
            ("OUTPUT_MAX_BYTES", "100"),
            ("OUTPUT_FLUSH_LINES", "0"),
            ("OUTPUT_FLUSH_MS", "5"),
            ("OUTPUT_FLUSH_BYTES", "4096"),
            ("ALLOW_INSECURE_HTTP", "yes"),
            ("LOG_FORMAT", "text"),
            ("KILL_GRACE_SECONDS", "2"),
            ("AGENT_CONTAINER", "true"),
            ("PRIVATE_DIR", "/var/lib/repobox"),
            ("AGENT_START_TIMEOUT_SECONDS", "30"),
            ("GIT_SSL_CAINFO", "/etc/git-ca/ca.crt"),
            ("OPEN_PULL_REQUESTS", "false"),
        ]);
        let c = cfg(&p).unwrap();
        assert_eq!(c.runner_id, "pod-abc");
        assert_eq!(c.temp_dir, PathBuf::from("/work"));
        assert!(!c.cleanup_after_job);
        assert_eq!(
            (c.git_author_name.as_str(), c.git_author_email.as_str()),
            ("Bot", "bot@x")
        );
        assert_eq!(c.clone_depth, 0);
        assert_eq!(c.agent_command.as_deref(), Some("echo hi"));
        assert_eq!(c.agent_env, ["ANTHROPIC_API_KEY", "OTHER"]);
        assert_eq!(c.output.max_bytes, 100);
        assert_eq!(c.output.flush_lines, 1, "0 lines would never flush");
        assert_eq!(c.output.flush_interval, Duration::from_millis(5));
        assert_eq!(c.output.flush_bytes, 4096);
        assert!(c.allow_insecure_http);
        assert_eq!(c.log_format, LogFormat::Text);
        assert_eq!(c.kill_grace, Duration::from_secs(2));
        assert!(c.agent_container);
        assert_eq!(c.private_dir, PathBuf::from("/var/lib/repobox"));
        assert_eq!(c.agent_start_timeout, Duration::from_secs(30));
        assert_eq!(c.git_ca_file, Some(PathBuf::from("/etc/git-ca/ca.crt")));
        assert!(!c.open_pull_requests);
    }

    #[test]
    fn every_redis_scheme_the_operator_accepts_is_accepted() {
        for url in [
            "valkey://h:6379",
            "valkeys://h",
            "redis+unix:///s",
            "unix:///s",
            "rediss://h",
        ] {
            let mut p = base();
            p[1] = ("REDIS_URL", url);
            assert!(cfg(&p).is_ok(), "{url}");
        }
    }

    #[test]
    fn missing_settings_are_named() {
        for missing in ["JOB_ID", "REDIS_URL", "ENCRYPTION_KEY"] {
            let p: Vec<_> = base().into_iter().filter(|(k, _)| *k != missing).collect();
            let e = cfg(&p).unwrap_err();
            assert_eq!(e.setting, missing);
            assert!(e.to_string().contains(missing));
        }
        // Blank counts as missing.
        let mut p = base();
        p[0] = ("JOB_ID", "   ");
        assert_eq!(cfg(&p).unwrap_err().setting, "JOB_ID");
    }

    #[test]
    fn malformed_settings_are_named_without_echoing_secrets() {
        let mut p = base();
        p[2] = ("ENCRYPTION_KEY", "not-a-valid-key-hunter2");
        let e = cfg(&p).unwrap_err();
        assert_eq!(e.setting, "ENCRYPTION_KEY");
        assert!(!e.to_string().contains("hunter2"), "{e}");

        for (k, v) in [
            ("CLEANUP_AFTER_JOB", "maybe"),
            ("GIT_CLONE_DEPTH", "-1"),
            ("OUTPUT_MAX_BYTES", "lots"),
            ("OUTPUT_FLUSH_LINES", "51"),
            ("OUTPUT_FLUSH_MS", "2001"),
            ("OUTPUT_FLUSH_BYTES", "262145"),
            ("OUTPUT_FLUSH_BYTES", "1023"),
            ("LOG_FORMAT", "xml"),
            ("ALLOW_INSECURE_HTTP", "2"),
            ("AGENT_CONTAINER", "perhaps"),
            ("AGENT_START_TIMEOUT_SECONDS", "soon"),
            ("OPEN_PULL_REQUESTS", "sometimes"),
        ] {
            let mut p = base();
            p.push((k, v));
            assert_eq!(cfg(&p).unwrap_err().setting, k, "{k}={v}");
        }

        let mut p = base();
        p[1] = ("REDIS_URL", "localhost:6379");
        assert_eq!(cfg(&p).unwrap_err().setting, "REDIS_URL");
    }

    #[test]
    fn key_from_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, format!("{HEX}\n")).unwrap();
        let path_s = path.to_string_lossy().to_string();
        let p = vec![
            ("JOB_ID", "j"),
            ("REDIS_URL", "redis://127.0.0.1/"),
            ("ENCRYPTION_KEY_FILE", path_s.as_str()),
        ];
        assert!(cfg(&p).is_ok());

        let mut both = p.clone();
        both.push(("ENCRYPTION_KEY", HEX));
        assert_eq!(cfg(&both).unwrap_err().setting, "ENCRYPTION_KEY");

        std::fs::write(&path, "short").unwrap();
        let e = cfg(&p).unwrap_err();
        assert_eq!(e.setting, "ENCRYPTION_KEY_FILE");
        assert!(!e.to_string().contains("short"));

        let gone = vec![
            ("JOB_ID", "j"),
            ("REDIS_URL", "redis://127.0.0.1/"),
            ("ENCRYPTION_KEY_FILE", "/nonexistent/key"),
        ];
        assert!(
            cfg(&gone)
                .unwrap_err()
                .to_string()
                .contains("cannot be read")
        );
    }

    #[test]
    fn debug_hides_the_redis_password_and_key() {
        let c = cfg(&base()).unwrap();
        let d = format!("{c:?}");
        assert!(!d.contains(":pw@"), "{d}");
        assert!(!d.contains(HEX), "{d}");
    }
}

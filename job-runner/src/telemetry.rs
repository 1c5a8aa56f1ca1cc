//! Logs: JSON lines by default (one object per event, with the span's `runner_id`,
//! `job_id`, `user_id`), human-readable text with `LOG_FORMAT=text`. Level from `RUST_LOG`
//! or `LOG_LEVEL` (default `info`). Logs go to stderr; job output goes to Redis. The set-up
//! itself is the operator's too (`repobox_process::init_logging`).

use repobox_contract::runner_env;

use crate::config::LogFormat;

/// Installs the global subscriber at `LOG_LEVEL` (read here: it applies before the rest of
/// the configuration is read, and to every subcommand).
pub fn init(format: LogFormat) {
    let level = std::env::var(runner_env::LOG_LEVEL)
        .ok()
        .filter(|l| !l.trim().is_empty())
        .unwrap_or_else(|| runner_env::DEFAULT_LOG_LEVEL.to_owned());
    repobox_process::init_logging(&level, format);
}

/// The process's peak resident set size in KiB (`VmHWM`), for the final log line and the
/// benchmark. `None` where `/proc` is not available.
pub fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

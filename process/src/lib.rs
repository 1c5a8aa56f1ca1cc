//! What the operator and the job-runner do alike as processes: log in the same format (JSON
//! lines or text, on stderr) and stop gracefully on SIGTERM or SIGINT.
//!
//! Not part of `repobox-contract`: that crate is the Redis contract and has no async runtime or
//! log subscriber of its own; this one only gathers what both binaries already link
//! (tracing-subscriber, tokio's signals, tokio-util), so neither binary grows.

#![warn(missing_docs)]

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// Log output format (`LOG_FORMAT`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum LogFormat {
    /// One JSON object per line (for log collectors).
    #[default]
    Json,
    /// Human-readable text.
    Text,
}

impl LogFormat {
    /// `json` or `text`, exactly (callers trim and choose how to treat anything else).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "json" => Some(Self::Json),
            "text" => Some(Self::Text),
            _ => None,
        }
    }
}

/// Installs the global subscriber, writing to stderr.
///
/// `RUST_LOG`, when set and valid, overrides `level` (`LOG_LEVEL`), so a developer can turn up a
/// single module without editing the deployment's settings; an invalid filter falls back to
/// `info` rather than failing start-up over a log setting. JSON events are flattened (fields at
/// the top level, where log queries expect them) and carry the list of enclosing spans (they
/// name the object or job). A second call does nothing, so tests may call it freely.
pub fn init_logging(level: &str, format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // `try_init` fails only when a global subscriber is already set: keep the first one.
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Cancels `token` on the first SIGTERM or SIGINT, after calling `on_signal` with its name
/// (each binary words its own log line). Spawned on the current runtime; abort the handle when
/// the work ends first.
pub fn cancel_on_signals(
    token: CancellationToken,
    on_signal: impl FnOnce(&'static str) + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!("cannot install signal handlers");
            return;
        };
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        on_signal(name);
        token.cancel();
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn log_format_names() {
        assert_eq!(LogFormat::from_name("json"), Some(LogFormat::Json));
        assert_eq!(LogFormat::from_name("text"), Some(LogFormat::Text));
        assert_eq!(LogFormat::from_name("xml"), None);
        assert_eq!(LogFormat::default(), LogFormat::Json);
    }

    #[test]
    fn double_init_and_bad_levels_do_not_panic() {
        init_logging("not a [valid filter", LogFormat::Json);
        init_logging("debug", LogFormat::Text);
        tracing::info!("still logging");
    }

    #[tokio::test]
    async fn a_signal_cancels_the_token_once_named() {
        let token = CancellationToken::new();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = cancel_on_signals(token.clone(), move |name| {
            let _ = tx.send(name);
        });
        // A listener of our own first, so that a SIGINT raised before the task's handlers are
        // in place is caught rather than ending the test process; raise until one lands.
        let _guard = signal(SignalKind::interrupt()).unwrap();
        let mut cancelled = false;
        for _ in 0..50 {
            nix::sys::signal::raise(nix::sys::signal::Signal::SIGINT).unwrap();
            if tokio::time::timeout(Duration::from_millis(100), token.cancelled())
                .await
                .is_ok()
            {
                cancelled = true;
                break;
            }
        }
        assert!(cancelled, "SIGINT did not cancel the token");
        assert_eq!(rx.await.unwrap(), "SIGINT");
        task.await.unwrap();
    }
}

//! Logging set-up: JSON lines (the default, for log collectors) or human-readable text, on
//! stderr like the job-runner's logs (one set-up for both: `repobox_process::init_logging`).

use crate::config::LogFormat;

/// Installs the global subscriber.
///
/// `RUST_LOG`, when set and valid, overrides `level` (`LOG_LEVEL`), so a developer can turn up a
/// single module without editing the Deployment's settings; an invalid filter falls back to
/// `info` rather than failing start-up over a log setting. JSON events carry the list of
/// enclosing spans (the controller's `reconcile` span names the object). A second call does
/// nothing, so tests may call it freely.
pub fn init(level: &str, format: LogFormat) {
    repobox_process::init_logging(level, format);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn double_init_and_bad_levels_do_not_panic() {
        init("not a [valid filter", LogFormat::Json);
        init("debug", LogFormat::Text);
        tracing::info!("still logging");
    }
}

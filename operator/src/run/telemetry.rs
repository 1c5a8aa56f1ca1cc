//! Logging set-up: JSON lines (the default, for log collectors) or human-readable text, on
//! stderr like the job-runner's logs.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber.
///
/// `RUST_LOG`, when set and valid, overrides `level` (`LOG_LEVEL`), so a developer can turn up a
/// single module without editing the Deployment's settings; an invalid filter falls back to
/// `info` rather than failing start-up over a log setting. JSON events are flattened (fields at
/// the top level, where log queries expect them) and carry the list of enclosing spans (the
/// controller's `reconcile` span names the object). A second call does nothing, so tests may
/// call it freely.
pub fn init(level: &str, format: LogFormat) {
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

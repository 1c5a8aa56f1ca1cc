use std::process::ExitCode;

use repobox_job_runner::config::{Config, LogFormat};
use repobox_job_runner::{askpass, run, telemetry};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// Exit code when the configuration is unusable (the job was not touched).
const EXIT_CONFIG: u8 = 2;
/// Exit code when the executor could not reach or read the job (Redis down, no hash).
const EXIT_INFRA: u8 = 3;

fn main() -> ExitCode {
    // git calls this same binary as its GIT_ASKPASS helper.
    if askpass::is_askpass_invocation() {
        return ExitCode::from(askpass::main() as u8);
    }
    let cfg = match Config::from_env() {
        Ok(cfg) => cfg,
        Err(e) => {
            telemetry::init(LogFormat::Json);
            tracing::error!(setting = e.setting, "{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    telemetry::init(cfg.log_format);

    // One thread is plenty for one job and keeps the pod's memory small.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::from(EXIT_INFRA);
        }
    };
    runtime.block_on(async {
        let cancel = CancellationToken::new();
        let on_signal = cancel.clone();
        let signals = tokio::spawn(async move {
            let (Ok(mut term), Ok(mut int)) =
                (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
            else {
                tracing::error!("cannot install signal handlers");
                return;
            };
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            tracing::warn!(signal = name, "stop requested");
            on_signal.cancel();
        });
        let code = match run::run(&cfg, cancel).await {
            Ok(outcome) => ExitCode::from(outcome.exit_code()),
            Err(e) => {
                tracing::error!(job_id = %cfg.job_id, runner_id = %cfg.runner_id, error = %e, "job could not be run");
                ExitCode::from(EXIT_INFRA)
            }
        };
        signals.abort();
        code
    })
}

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use repobox_contract::runner_env;
use repobox_job_runner::config::{Config, LogFormat};
use repobox_job_runner::handoff::RunnerSide;
use repobox_job_runner::{agent, askpass, run, telemetry};
use tokio_util::sync::CancellationToken;

/// Exit code when the configuration is unusable (the job was not touched).
const EXIT_CONFIG: u8 = 2;
/// Exit code when the executor could not reach or read the job (Redis down, no hash).
const EXIT_INFRA: u8 = 3;

/// The binary's file name where `install` puts it.
const INSTALLED_NAME: &str = "repobox-job-runner";

fn main() -> ExitCode {
    // git calls this same binary as its GIT_ASKPASS helper.
    if askpass::is_askpass_invocation() {
        return ExitCode::from(askpass::main() as u8);
    }
    repobox_contract::install_tls_provider();
    let mut args = std::env::args_os().skip(1);
    match args.next().as_deref().and_then(|a| a.to_str()) {
        Some("agent") => agent_main(),
        Some("install") => install_main(args.map(PathBuf::from).collect()),
        Some(other) => {
            eprintln!("unknown subcommand `{other}` (expected: agent, install DIR, or none)");
            ExitCode::from(EXIT_CONFIG)
        }
        None => runner_main(),
    }
}

/// `LOG_FORMAT` before (or without) the rest of the configuration: anything but `text` is
/// JSON, so a log line about a bad setting still gets out.
fn log_format_from_env() -> LogFormat {
    match std::env::var(runner_env::LOG_FORMAT).as_deref() {
        Ok("text") => LogFormat::Text,
        _ => LogFormat::Json,
    }
}

fn runtime() -> Option<tokio::runtime::Runtime> {
    // One thread is plenty for one job and keeps the pod's memory small.
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => Some(rt),
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            None
        }
    }
}

/// Cancels `token` on SIGTERM or SIGINT.
fn cancel_on_signals(token: CancellationToken) -> tokio::task::JoinHandle<()> {
    repobox_process::cancel_on_signals(token, |name| {
        tracing::warn!(signal = name, "stop requested");
    })
}

fn runner_main() -> ExitCode {
    // In a pod the agent container waits in the hand-off directory; claim it before anything
    // can fail, so the agent learns at once when this process ends, however it ends.
    let early_handoff = early_handoff();
    let cfg = match Config::from_env() {
        Ok(cfg) => cfg,
        Err(e) => {
            telemetry::init(log_format_from_env());
            tracing::error!(setting = e.setting, "{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    telemetry::init(cfg.log_format);
    // Files the runner writes into the shared tree stay writable for the agent (same group).
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o002));
    let handoff = match early_handoff {
        Some(Ok(side)) => Some(side),
        Some(Err(e)) => {
            tracing::error!(error = %e, "cannot prepare the agent hand-off directory");
            return ExitCode::from(EXIT_INFRA);
        }
        None => None,
    };
    let Some(runtime) = runtime() else {
        return ExitCode::from(EXIT_INFRA);
    };
    runtime.block_on(async {
        let cancel = CancellationToken::new();
        let signals = cancel_on_signals(cancel.clone());
        let code = match run::run(&cfg, handoff, cancel).await {
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

/// The hand-off directory of an agent container (`AGENT_CONTAINER=true`), prepared from the
/// raw environment, before the rest of the configuration is read.
fn early_handoff() -> Option<std::io::Result<RunnerSide>> {
    let on = std::env::var(runner_env::AGENT_CONTAINER).is_ok_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "1" | "true" | "yes" | "on"
        )
    });
    if !on {
        return None;
    }
    let temp = std::env::var_os(runner_env::TEMP_DIR)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(runner_env::DEFAULT_TEMP_DIR));
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o002));
    let side = RunnerSide::prepare(&temp.join(repobox_contract::pod::HANDOFF_SUBDIR));
    nix::sys::stat::umask(old);
    Some(side)
}

fn agent_main() -> ExitCode {
    telemetry::init(log_format_from_env());
    let cfg = match agent::AgentConfig::from_env() {
        Ok(cfg) => cfg,
        Err(e) => {
            tracing::error!(setting = e.setting, "{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let Some(runtime) = runtime() else {
        return ExitCode::from(EXIT_INFRA);
    };
    runtime.block_on(async {
        let stop = CancellationToken::new();
        let signals = cancel_on_signals(stop.clone());
        let code = match agent::run(&cfg, stop).await {
            Ok(end) => ExitCode::from(end.exit_code()),
            Err(e) => {
                tracing::error!(error = %e, "the agent wrapper failed");
                ExitCode::from(EXIT_INFRA)
            }
        };
        signals.abort();
        code
    })
}

/// `install BIN_DIR [SHARED_DIR...]`: the init container's job. Copies this binary into
/// `BIN_DIR` (so an agent image of any kind can run the wrapper) and creates each shared
/// directory group-writable with the set-group-id bit (the pod's `fsGroup`), so the runner and
/// the agent, two users of one group, can both work in them.
fn install_main(dirs: Vec<PathBuf>) -> ExitCode {
    use std::os::unix::fs::PermissionsExt;
    telemetry::init(log_format_from_env());
    let Some((bin_dir, shared)) = dirs.split_first() else {
        tracing::error!(
            "install needs a target directory: repobox-job-runner install BIN_DIR [SHARED_DIR...]"
        );
        return ExitCode::from(EXIT_CONFIG);
    };
    let result = install(bin_dir).and_then(|path| {
        for dir in shared {
            std::fs::create_dir_all(dir)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o2775))?;
        }
        Ok(path)
    });
    match result {
        Ok(path) => {
            tracing::info!(path = %path.display(), shared = ?shared, "installed");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, dir = %bin_dir.display(), "install failed");
            ExitCode::from(EXIT_INFRA)
        }
    }
}

fn install(dir: &Path) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let exe = std::env::current_exe()?;
    std::fs::create_dir_all(dir)?;
    let target = dir.join(INSTALLED_NAME);
    let tmp = dir.join(format!(".{INSTALLED_NAME}.tmp"));
    std::fs::copy(&exe, &tmp)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
    std::fs::rename(&tmp, &target)?;
    Ok(target)
}

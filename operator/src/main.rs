//! `repobox-operator`: `run` (the default) runs the operator; `crdgen` prints the CRD; `pause`,
//! `resume` and `pause-status` switch the runner side off and on (see `pause`), run in the
//! operator pod with `kubectl exec` so they use its Redis settings.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use repobox_operator::config::Config;
use repobox_operator::model::crd;
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(
    name = "repobox-operator",
    version,
    about = "Runs Repobox jobs as Kubernetes Jobs."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the operator (the default when no subcommand is given).
    Run(Box<Config>),
    /// Write the RepoboxJob CustomResourceDefinition as YAML.
    Crdgen {
        /// Write to this file instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Pause: no new entries are read and no queued job starts; running jobs finish.
    Pause {
        /// Shown on every queued RepoboxJob (reason `Paused`) and in `/readyz`.
        #[arg(long, default_value = "paused by an operator")]
        reason: String,
        #[command(flatten)]
        target: PauseTarget,
    },
    /// Resume after `pause` (the same `--user` to resume one user).
    Resume {
        #[command(flatten)]
        target: PauseTarget,
    },
    /// Print whether the runner side is paused.
    PauseStatus {
        #[command(flatten)]
        redis: RedisArgs,
    },
}

/// What `pause` / `resume` act on.
#[derive(clap::Args, Debug)]
struct PauseTarget {
    /// Only this user's queued jobs (their new entries are still accepted).
    #[arg(long)]
    user: Option<String>,
    #[command(flatten)]
    redis: RedisArgs,
}

/// The Redis settings of the pause commands: the operator's own environment.
#[derive(clap::Args, Debug)]
struct RedisArgs {
    /// Redis connection URL.
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    redis_url: String,
    /// A PEM CA bundle for `rediss://`.
    #[arg(long, env = "REDIS_CA_FILE")]
    redis_ca_file: Option<PathBuf>,
}

/// Subcommand names; anything else as the first argument means `run`.
const SUBCOMMANDS: [&str; 6] = ["run", "crdgen", "help", "pause", "resume", "pause-status"];

/// Inserts `run` when no subcommand is given, so `repobox-operator` and
/// `repobox-operator --max-jobs-per-user 5` both run the operator. Top-level `--help` and
/// `--version` are left alone.
fn with_default_subcommand(mut args: Vec<OsString>) -> Vec<OsString> {
    let first = args.get(1).and_then(|a| a.to_str());
    let explicit = match first {
        Some(a) => SUBCOMMANDS.contains(&a) || ["-h", "--help", "-V", "--version"].contains(&a),
        None => false,
    };
    if !explicit {
        args.insert(1.min(args.len()), OsString::from("run"));
    }
    args
}

fn run(config: Config) -> ExitCode {
    repobox_operator::run::telemetry::init(&config.log_level, config.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        repobox_process::cancel_on_signals(shutdown.clone(), |name| {
            tracing::info!(signal = name, "shutting down gracefully");
        });
        tracing::info!(
            runner_id = config.runner_id(),
            namespace = config.jobs_namespace(),
            config = ?config,
            "starting"
        );
        match repobox_operator::app::run(config, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "the operator stopped with an error");
                ExitCode::FAILURE
            }
        }
    })
}

fn crdgen(out: Option<PathBuf>) -> ExitCode {
    let yaml = match crd::crd_yaml() {
        Ok(y) => y,
        Err(e) => {
            eprintln!("crdgen: {e}");
            return ExitCode::FAILURE;
        }
    };
    match out {
        None => {
            print!("{yaml}");
            ExitCode::SUCCESS
        }
        Some(path) => match std::fs::write(&path, yaml) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("crdgen: cannot write {}: {e}", path.display());
                ExitCode::FAILURE
            }
        },
    }
}

/// What a pause command does.
enum PauseAction {
    Pause(String),
    Resume,
    Status,
}

/// Runs a pause command and prints the resulting state.
fn pause_command(redis: &RedisArgs, user: Option<&str>, action: PauseAction) -> ExitCode {
    use repobox_operator::run::pause;
    let client =
        match repobox_contract::redis_client(&redis.redis_url, redis.redis_ca_file.as_deref()) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("invalid Redis settings: {e}");
                return ExitCode::FAILURE;
            }
        };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: repobox_operator::Result<pause::PauseState> = runtime.block_on(async {
        let mut con = client.get_multiplexed_async_connection().await?;
        match action {
            PauseAction::Pause(reason) => pause::pause(&mut con, user, &reason).await?,
            PauseAction::Resume => pause::resume(&mut con, user).await?,
            PauseAction::Status => {}
        }
        pause::read(&mut con).await
    });
    match result {
        Ok(state) => {
            println!("{}", pause::describe(&state));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("Redis: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    repobox_contract::install_tls_provider();
    let cli = Cli::parse_from(with_default_subcommand(std::env::args_os().collect()));
    match cli.command {
        Command::Run(config) => run(*config),
        Command::Crdgen { out } => crdgen(out),
        Command::Pause { reason, target } => pause_command(
            &target.redis,
            target.user.as_deref(),
            PauseAction::Pause(reason),
        ),
        Command::Resume { target } => {
            pause_command(&target.redis, target.user.as_deref(), PauseAction::Resume)
        }
        Command::PauseStatus { redis } => pause_command(&redis, None, PauseAction::Status),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn args(a: &[&str]) -> Vec<OsString> {
        a.iter().map(OsString::from).collect()
    }

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_is_the_default_subcommand() {
        assert_eq!(with_default_subcommand(args(&["op"])), args(&["op", "run"]));
        assert_eq!(
            with_default_subcommand(args(&["op", "--max-jobs-per-user", "5"])),
            args(&["op", "run", "--max-jobs-per-user", "5"])
        );
        assert_eq!(
            with_default_subcommand(args(&["op", "run"])),
            args(&["op", "run"])
        );
        assert_eq!(
            with_default_subcommand(args(&["op", "crdgen", "--out", "x"])),
            args(&["op", "crdgen", "--out", "x"])
        );
        assert_eq!(
            with_default_subcommand(args(&["op", "--help"])),
            args(&["op", "--help"])
        );
        assert_eq!(
            with_default_subcommand(args(&["op", "-V"])),
            args(&["op", "-V"])
        );
        assert_eq!(with_default_subcommand(args(&[])), args(&["run"]));
    }

    #[test]
    fn parses_subcommands() {
        let cli = Cli::try_parse_from(with_default_subcommand(args(&[
            "op",
            "crdgen",
            "--out",
            "crds/x.yaml",
        ])))
        .unwrap();
        assert!(
            matches!(cli.command, Command::Crdgen { out: Some(ref p) } if p == &PathBuf::from("crds/x.yaml"))
        );
        let cli = Cli::try_parse_from(with_default_subcommand(args(&[
            "op",
            "--redis-url",
            "redis://h",
        ])))
        .unwrap();
        assert!(
            matches!(cli.command, Command::Run(ref c) if c.redis.redis_url.expose() == "redis://h")
        );
        let cli = Cli::try_parse_from(with_default_subcommand(args(&[
            "op",
            "pause",
            "--reason",
            "db upgrade",
            "--redis-url",
            "redis://h",
        ])))
        .unwrap();
        assert!(
            matches!(cli.command, Command::Pause { ref reason, ref target } if reason == "db upgrade" && target.user.is_none())
        );
        let cli = Cli::try_parse_from(with_default_subcommand(args(&[
            "op",
            "resume",
            "--user",
            "u1",
            "--redis-url",
            "redis://h",
        ])))
        .unwrap();
        assert!(
            matches!(cli.command, Command::Resume { ref target } if target.user.as_deref() == Some("u1"))
        );
    }
}

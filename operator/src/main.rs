//! `repobox-operator`: `run` (the default) runs the operator; `crdgen` prints the CRD.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use repobox_operator::config::Config;
use repobox_operator::crd;
use tokio::signal::unix::{SignalKind, signal};
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
}

/// Subcommand names; anything else as the first argument means `run`.
const SUBCOMMANDS: [&str; 3] = ["run", "crdgen", "help"];

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
    repobox_operator::telemetry::init(&config.log_level, config.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        let on_signal = shutdown.clone();
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
            tracing::info!(signal = name, "shutting down gracefully");
            on_signal.cancel();
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

fn main() -> ExitCode {
    repobox_contract::install_tls_provider();
    let cli = Cli::parse_from(with_default_subcommand(std::env::args_os().collect()));
    match cli.command {
        Command::Run(config) => run(*config),
        Command::Crdgen { out } => crdgen(out),
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
        assert!(matches!(cli.command, Command::Run(ref c) if c.redis_url.expose() == "redis://h"));
    }
}

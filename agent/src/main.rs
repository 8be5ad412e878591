//! `fleet-agent`: the daemon on every host. It pulls signed releases, applies them only when
//! healthy and rolls back by itself.
//!
//! Exit codes (also in docs/fleet-agent.md):
//!
//! | code | meaning |
//! |------|---------|
//! | 0 | success: committed, already up to date, nothing released, or waiting |
//! | 1 | an operation failed before the system was touched (channel, cache, Nix); retried later; or stopped mid-trial (resumed at the next start) |
//! | 2 | usage or configuration error |
//! | 3 | the release was refused (signature, serial, expiry, fleet, host entry, format) |
//! | 4 | the candidate failed and the host rolled back to its last good system |
//! | 5 | the host needs a person: safe mode (corrupt state) or a failed rollback |

mod command;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "fleet-agent",
    version,
    about = "Pull, verify and apply signed NixOS releases"
)]
struct Cli {
    /// The config file.
    #[arg(
        long,
        short,
        global = true,
        env = "FLEET_AGENT_CONFIG",
        default_value = "/etc/fleet-agent/config.toml"
    )]
    config: PathBuf,
    /// Log every command run.
    #[arg(long, short, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run as a daemon: poll, apply, repeat.
    Run,
    /// Run one full cycle now and exit with its outcome.
    Once {
        /// Print the outcome as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show the current, candidate and last good systems, the last error and the next poll.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Make the running daemon poll now (same as SIGHUP).
    PollNow,
    /// Validate a config file and explain it.
    CheckConfig {
        /// The file to check (default: --config).
        file: Option<PathBuf>,
    },
    /// Print this host's report key (made on first use), to list as its report_key in
    /// fleet.toml.
    Identity,
    /// Move a corrupt state file aside and start over from the running system.
    ResetState,
    /// Record the result of a switch's transient unit in FILE (run by systemd as the unit's
    /// ExecStopPost, with SERVICE_RESULT, EXIT_CODE and EXIT_STATUS set; not for people).
    #[command(hide = true)]
    SwitchResult { file: PathBuf },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    fleet_agent::logging::init("fleet-agent", cli.verbose);
    // Commands that print and exit end quietly when their reader goes (`status | head`); the
    // daemon and the cycle keep Rust's default (SIGPIPE ignored, a failed write is an error).
    if matches!(
        cli.command,
        Command::Status { .. } | Command::CheckConfig { .. } | Command::Identity
    ) {
        sigpipe::reset();
    }
    let code = match cli.command {
        Command::Run => command::run::run(&cli.config),
        Command::Once { json } => command::once::run(&cli.config, json),
        Command::Status { json } => command::status::run(&cli.config, json),
        Command::PollNow => command::poll_now::run(&cli.config),
        Command::CheckConfig { file } => {
            command::check_config::run(file.as_deref().unwrap_or(&cli.config))
        }
        Command::Identity => command::identity::run(&cli.config),
        Command::ResetState => command::status::reset(&cli.config),
        Command::SwitchResult { file } => match fleet_agent::activate::record_result(&file) {
            Ok(line) => {
                println!("switch result: {line}");
                0
            }
            Err(e) => {
                eprintln!(
                    "fleet-agent: cannot record the switch result in {}: {e}",
                    file.display()
                );
                1
            }
        },
    };
    ExitCode::from(code)
}

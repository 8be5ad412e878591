//! `fleet-sign`: the operator's side of fleet: keys, building, signing and publishing releases.
//!
//! Exit codes (also in docs/fleet-sign.md):
//!
//! | code | meaning |
//! |------|---------|
//! | 0 | success |
//! | 1 | an operation failed: nix, git, network or file system; retrying may help |
//! | 2 | usage or configuration error, or a refusal that needs a person (fix the input) |
//! | 3 | a release was refused by verification (bad signature, expired, wrong fleet, …) |

mod channel;
mod collect;
mod command;
mod config;
mod git;
mod keyfile;
mod nix;
mod objects;
mod process;
mod progress;
mod record;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "fleet-sign",
    version,
    about = "Sign and publish releases for a NixOS fleet"
)]
struct Cli {
    /// Print every command run (nix, git) to stderr.
    #[arg(long, short, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Keygen(command::keygen::Args),
    Release(command::release::Args),
    /// Release in waves and promote each once the collector shows the earlier ones healthy.
    Rollout(command::rollout::Args),
    /// Move the next wave of the rollout in progress (a new serial, signed).
    Promote(command::release::Args),
    /// Hold the rollout in progress: no wave is promoted until resume.
    Pause(command::release::Args),
    /// Let the paused rollout be promoted again.
    Resume(command::release::Args),
    /// End the rollout: hosts it moved get their previous systems back, the rest keep theirs.
    Abort(command::release::Args),
    Sign(command::sign::Args),
    Refresh(command::refresh::Args),
    Verify(command::verify::Args),
    Collect(command::collect::Args),
    Status(command::status::Args),
}

/// A mistake in what the user asked for, or a refusal that needs a person: exit code 2, with
/// a reason code where the refusal has one.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct UsageError {
    code: &'static str,
    message: String,
}

/// Wraps a message as a [`UsageError`].
pub fn usage(message: impl Into<String>) -> anyhow::Error {
    refusal("usage", message)
}

/// A refusal with its reason code (`channel_behind`, `serial_too_low`, …), also in the text.
pub fn refusal(code: &'static str, message: impl Into<String>) -> anyhow::Error {
    UsageError {
        code,
        message: message.into(),
    }
    .into()
}

/// The reason code of an error: a refusal's own, a verification's, else `failed`.
fn error_code(error: &anyhow::Error) -> &'static str {
    for e in error.chain() {
        if let Some(e) = e.downcast_ref::<fleet_agent::release::VerifyError>() {
            return e.code();
        }
        if let Some(e) = e.downcast_ref::<UsageError>() {
            return e.code;
        }
    }
    "failed"
}

fn exit_code(error: &anyhow::Error) -> u8 {
    if error
        .chain()
        .any(|e| e.is::<fleet_agent::release::VerifyError>())
    {
        3
    } else if error.chain().any(|e| e.is::<UsageError>()) {
        2
    } else {
        1
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    process::set_verbose(cli.verbose);
    fleet_agent::logging::init("fleet-sign", cli.verbose);
    // Commands that only read and print end quietly when their reader goes (`verify | head`).
    // The ones that publish or serve keep Rust's default (SIGPIPE ignored, so a socket or a
    // child's pipe closing is an error, not death); they print to stdout only once published.
    if matches!(
        cli.command,
        Command::Verify(_) | Command::Status(_) | Command::Keygen(_)
    ) {
        sigpipe::reset();
    }
    let json = match &cli.command {
        Command::Release(args)
        | Command::Promote(args)
        | Command::Pause(args)
        | Command::Resume(args)
        | Command::Abort(args) => args.json(),
        Command::Rollout(args) => args.json(),
        Command::Verify(args) => args.json(),
        Command::Status(args) => args.json(),
        Command::Refresh(args) => args.json(),
        _ => false,
    };
    let result = match cli.command {
        Command::Keygen(args) => command::keygen::run(args),
        Command::Release(args) => command::release::run(args),
        Command::Rollout(args) => command::rollout::run(args),
        Command::Promote(args) => {
            command::release::run_op(args, command::release::Op::Promote).map(drop)
        }
        Command::Pause(args) => {
            command::release::run_op(args, command::release::Op::Pause).map(drop)
        }
        Command::Resume(args) => {
            command::release::run_op(args, command::release::Op::Resume).map(drop)
        }
        Command::Abort(args) => {
            command::release::run_op(args, command::release::Op::Abort).map(drop)
        }
        Command::Sign(args) => command::sign::run(args),
        Command::Refresh(args) => command::refresh::run(args),
        Command::Verify(args) => command::verify::run(args),
        Command::Collect(args) => command::collect::run(args),
        Command::Status(args) => command::status::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // A refusal names its reason code, as the hosts' reports and --json do.
            let text = format!("{error:#}");
            match error_code(&error) {
                "failed" | "usage" => eprintln!("fleet-sign: error: {text}"),
                code if text.contains(code) => eprintln!("fleet-sign: error: {text}"),
                code => eprintln!("fleet-sign: error ({code}): {text}"),
            }
            if json {
                // Every failure of a --json command is JSON on stdout too.
                let out = serde_json::json!({
                    "ok": false,
                    "code": error_code(&error),
                    "error": format!("{error:#}"),
                });
                println!(
                    "{}",
                    serde_json::to_string_pretty(&out).expect("serializes")
                );
            }
            ExitCode::from(exit_code(&error))
        }
    }
}

#[cfg(test)]
mod tests {
    /// clap's own consistency checks over every subcommand (they run only when parsing one).
    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory as _;
        super::Cli::command().debug_assert();
    }
}

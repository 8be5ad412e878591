//! The one subprocess helper: every `nix`, `systemctl`, `systemd-run` and
//! `switch-to-configuration` the agent runs goes through [`run`].
//!
//! It logs the command line, captures stdout and stderr, kills the child's whole process group
//! on timeout or cancellation, and its errors show the command, the exit status or signal, and
//! the tail of stderr.

use std::os::unix::process::ExitStatusExt as _;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

const STDERR_TAIL_LINES: usize = 15;

/// A command that could not run or did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("could not start `{command}`: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("`{command}` {status}{}", tail(.stderr))]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("`{command}` did not finish within {}: killed", humantime::format_duration(*.after))]
    TimedOut { command: String, after: Duration },
    #[error("`{command}` was cancelled: the agent is shutting down")]
    Cancelled { command: String },
}

impl ProcessError {
    /// Stderr of a command that ran and failed, for matching known Nix messages.
    pub fn stderr(&self) -> &str {
        match self {
            Self::Failed { stderr, .. } => stderr,
            _ => "",
        }
    }
}

fn tail(stderr: &str) -> String {
    stderr_tail(stderr, STDERR_TAIL_LINES, " / ")
}

/// ": " and the last `lines` lines of `stderr` joined by `separator`, or "" when it is empty.
/// Shared with `fleet-sign`'s subprocess helper.
pub fn stderr_tail(stderr: &str, lines: usize, separator: &str) -> String {
    let all: Vec<&str> = stderr.trim_end().lines().collect();
    if all.is_empty() {
        return String::new();
    }
    let start = all.len().saturating_sub(lines);
    format!(": {}", all[start..].join(separator))
}

/// "exited with status N" or "was killed by signal N".
pub fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => format!("was killed by signal {signal}"),
        (None, None) => "failed".into(),
    }
}

/// An error with its sources: "cannot connect: connection refused".
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text += &format!(": {e}");
        source = e.source();
    }
    text
}

/// Renders a command line for logs and errors.
pub fn command_line(command: &Command) -> String {
    std_command_line(command.as_std())
}

/// Renders a `std` command line for logs and errors (quoting arguments with spaces).
pub fn std_command_line(std: &std::process::Command) -> String {
    /// Arguments shown: a command over a whole fleet's store paths has thousands.
    const SHOWN: usize = 24;
    let args: Vec<_> = std::iter::once(std.get_program())
        .chain(std.get_args())
        .collect();
    let mut line = args
        .iter()
        .take(SHOWN)
        .map(|a| {
            let a = a.to_string_lossy();
            if a.is_empty() || a.contains([' ', '"', '\'', '\n']) {
                format!("{a:?}")
            } else {
                a.into_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ");
    if args.len() > SHOWN {
        line += &format!(" … ({} more arguments)", args.len() - SHOWN);
    }
    line
}

/// Kills a whole process group (the child was made its leader), so grandchildren go too.
async fn kill_group(pid: u32) {
    let _ = Command::new("kill")
        .arg("-KILL")
        .arg(format!("-{pid}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await;
}

/// Runs `command` to completion within `timeout`; returns its stdout when it exits 0.
pub async fn run(
    command: Command,
    timeout: Duration,
    cancel: &CancellationToken,
) -> Result<Vec<u8>, ProcessError> {
    run_output(command, timeout, cancel)
        .await
        .map(|(stdout, _)| stdout)
}

/// [`run`], returning stderr too (where Nix says what a dry run would do).
pub async fn run_output(
    mut command: Command,
    timeout: Duration,
    cancel: &CancellationToken,
) -> Result<(Vec<u8>, String), ProcessError> {
    let line = command_line(&command);
    log::debug!("running {line}");
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let child = command.spawn().map_err(|source| ProcessError::Spawn {
        command: line.clone(),
        source,
    })?;
    let pid = child.id();
    let outcome = tokio::select! {
        output = child.wait_with_output() => Ok(output),
        () = tokio::time::sleep(timeout) => Err(ProcessError::TimedOut { command: line.clone(), after: timeout }),
        () = cancel.cancelled() => Err(ProcessError::Cancelled { command: line.clone() }),
    };
    match outcome {
        Ok(Ok(output)) if output.status.success() => Ok((
            output.stdout,
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )),
        Ok(Ok(output)) => Err(ProcessError::Failed {
            command: line,
            status: describe(output.status),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }),
        Ok(Err(source)) => Err(ProcessError::Spawn {
            command: line,
            source,
        }),
        Err(error) => {
            if let Some(pid) = pid {
                kill_group(pid).await;
            }
            Err(error)
        }
    }
}

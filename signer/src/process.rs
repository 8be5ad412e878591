//! The one subprocess helper: every `nix` and `git` the signer runs goes through [`run`].
//!
//! It logs the command line when verbose, captures stdout and stderr, and on failure returns a
//! [`ProcessError`] that shows the command, its exit status or signal, and the tail of stderr.

use fleet_agent::process::{describe, std_command_line, stderr_tail};
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};

static VERBOSE: AtomicBool = AtomicBool::new(false);

/// Turns on logging of every command line to stderr.
pub fn set_verbose(on: bool) {
    VERBOSE.store(on, Ordering::Relaxed);
}

/// How many trailing lines of stderr an error shows.
const STDERR_TAIL_LINES: usize = 20;

/// A command that could not run or did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("could not start `{command}`: {source} (is it installed and on PATH?)")]
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
}

fn tail(stderr: &str) -> String {
    stderr_tail(stderr, STDERR_TAIL_LINES, "\n  ").replacen(": ", ":\n  ", 1)
}

/// Renders a command line for logs and errors.
pub fn command_line(command: &Command) -> String {
    std_command_line(command)
}

/// Runs `command` with `stdin` as its input and returns its stdout when it exits 0.
pub fn run_with_input(mut command: Command, stdin: &[u8]) -> Result<Vec<u8>, ProcessError> {
    let line = command_line(&command);
    if VERBOSE.load(Ordering::Relaxed) {
        eprintln!("+ {line}");
    }
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().map_err(|source| ProcessError::Spawn {
        command: line.clone(),
        source,
    })?;
    let mut input = child.stdin.take().expect("stdin is piped");
    let input_bytes = stdin.to_vec();
    // Write from a thread so a child that fills its stdout pipe before reading cannot deadlock.
    let writer = std::thread::spawn(move || input.write_all(&input_bytes));
    let output = child
        .wait_with_output()
        .map_err(|source| ProcessError::Spawn {
            command: line.clone(),
            source,
        })?;
    // A child that exits without reading its input is judged by its exit status alone.
    let _ = writer.join();
    if output.status.success() {
        Ok(output.stdout)
    } else {
        Err(ProcessError::Failed {
            command: line,
            status: describe(output.status),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }
}

/// Runs `command` with empty input and returns its stdout when it exits 0.
pub fn run(command: Command) -> Result<Vec<u8>, ProcessError> {
    run_with_input(command, &[])
}

/// Runs a `nix` command whose stderr is its structured log (`--log-format internal-json`),
/// feeding `progress` each line as it comes; returns its stdout when it exits 0, else an error
/// with what Nix said and the failing build's log.
pub fn run_nix(
    mut command: Command,
    progress: &mut crate::progress::NixProgress,
) -> Result<Vec<u8>, ProcessError> {
    use std::io::{BufRead as _, Read as _};
    let line = command_line(&command);
    if VERBOSE.load(Ordering::Relaxed) {
        eprintln!("+ {line}");
    }
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let spawn_error = |source| ProcessError::Spawn {
        command: line.clone(),
        source,
    };
    let mut child = command.spawn().map_err(spawn_error)?;
    let mut stdout = child.stdout.take().expect("stdout is piped");
    // Read from a thread so a child that fills its stdout pipe cannot stall its stderr.
    let reader = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        stdout.read_to_end(&mut bytes).map(|_| bytes)
    });
    let stderr = std::io::BufReader::new(child.stderr.take().expect("stderr is piped"));
    for text in stderr.split(b'\n') {
        match text {
            Ok(text) => progress.line(&String::from_utf8_lossy(&text)),
            Err(_) => break,
        }
    }
    let status = child.wait().map_err(spawn_error)?;
    let stdout = reader
        .join()
        .unwrap_or_else(|_| Ok(Vec::new()))
        .map_err(spawn_error)?;
    if status.success() {
        Ok(stdout)
    } else {
        Err(ProcessError::Failed {
            command: line,
            status: describe(status),
            stderr: progress.failure(),
        })
    }
}

//! One module per subcommand.

pub mod check_config;
pub mod identity;
pub mod once;
pub mod poll_now;
pub mod run;
pub mod status;

use fleet_agent::config::Config;
use std::path::Path;

/// Loads the config or prints why not (exit code 2).
pub fn load_config(path: &Path) -> Result<Config, u8> {
    Config::load(path).map_err(|e| {
        eprintln!("fleet-agent: error: {e}");
        2
    })
}

/// A single-threaded runtime: the agent does one thing at a time and must stay small.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

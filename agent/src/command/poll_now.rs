//! `fleet-agent poll-now`: wake the running daemon (SIGHUP to the pid it recorded).

use fleet_agent::state::Runtime;
use std::path::Path;

pub fn run(path: &Path) -> u8 {
    let config = match super::load_config(path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let Some(runtime) = Runtime::load(&config.runtime_dir) else {
        eprintln!(
            "fleet-agent: error: no running agent recorded in {} (is fleet-agent run active?)",
            config.runtime_dir.display()
        );
        return 1;
    };
    let status = std::process::Command::new("kill")
        .args(["-HUP", &runtime.pid.to_string()])
        .status();
    match status {
        Ok(s) if s.success() => {
            println!("asked fleet-agent (pid {}) to poll now", runtime.pid);
            0
        }
        _ => {
            eprintln!(
                "fleet-agent: error: cannot signal pid {}: is the agent running?",
                runtime.pid
            );
            1
        }
    }
}

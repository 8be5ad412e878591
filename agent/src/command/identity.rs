//! `fleet-agent identity`: prints this host's report key, making it on first use.

use super::load_config;
use fleet_agent::identity;
use std::path::Path;

pub fn run(path: &Path) -> u8 {
    let config = match load_config(path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    match identity::public(&config.state_dir, &config.host) {
        Ok(key) => {
            println!("{key}");
            0
        }
        Err(e) => {
            eprintln!("fleet-agent: error: {e}");
            1
        }
    }
}

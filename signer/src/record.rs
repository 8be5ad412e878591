//! The workstation's record of the highest serial it issued per fleet, so that a channel rolled
//! back (a force-push, a restored bucket) cannot make `fleet-sign release` reissue a serial the
//! hosts already passed: they would refuse it (`serial_too_low`) while the operator saw success.
//!
//! `$XDG_STATE_HOME/fleet-sign/serials.json` (default `~/.local/state/…`), one entry per fleet
//! and trust root (the fleet's name and its trusted keys: two fleets of the same name with other
//! keys are other fleets), written whole with a temporary file and a rename. Losing it loses
//! only this check; every channel is read as well.

use anyhow::{Context as _, Result};
use fleet_agent::release::TrustPolicy;
use sha2::{Digest as _, Sha256};
use std::collections::BTreeMap;
use std::path::PathBuf;

pub struct Record {
    path: PathBuf,
    key: String,
}

impl Record {
    pub fn open(fleet: &str, trust: &TrustPolicy) -> Self {
        let mut keys: Vec<String> = trust.keys().iter().map(ToString::to_string).collect();
        keys.sort();
        let digest = Sha256::digest(keys.join("\n").as_bytes());
        let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        let dir = std::env::var_os("XDG_STATE_HOME")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
            .or_else(|| {
                std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".local/state"))
            })
            .unwrap_or_else(|| PathBuf::from("/var/lib"));
        Self {
            path: dir.join("fleet-sign/serials.json"),
            key: format!("{fleet} {hex}"),
        }
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    fn entries(&self) -> BTreeMap<String, u64> {
        std::fs::read(&self.path)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default()
    }

    /// The highest serial this workstation issued for the fleet, if it knows one.
    pub fn highest(&self) -> Option<u64> {
        self.entries().get(&self.key).copied()
    }

    /// Records `serial` as issued (never lowers the record).
    pub fn raise(&self, serial: u64) -> Result<()> {
        let mut entries = self.entries();
        let entry = entries.entry(self.key.clone()).or_insert(0);
        if *entry >= serial {
            return Ok(());
        }
        *entry = serial;
        let dir = self.path.parent().expect("a file in a directory");
        std::fs::create_dir_all(dir)
            .with_context(|| format!("could not create {}", dir.display()))?;
        crate::channel::write_atomic(
            &self.path,
            &serde_json::to_vec_pretty(&entries).expect("serializes"),
        )
        .with_context(|| {
            format!(
                "could not record serial {serial} in {}",
                self.path.display()
            )
        })
    }
}

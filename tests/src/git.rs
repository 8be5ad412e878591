//! git remotes for tests: bare repositories, served over loopback by `git daemon`.

use crate::{free_port, run, wait_for_port, KillOnDrop};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Creates a bare repository at `path`.
pub fn bare_repo(path: &Path) -> PathBuf {
    let mut command = Command::new("git");
    command.args(["init", "--quiet", "--bare"]).arg(path);
    run(command).ok();
    path.to_path_buf()
}

/// `git daemon` serving every repository below a directory, pushes allowed.
pub struct GitDaemon {
    _child: KillOnDrop,
    port: u16,
}

impl GitDaemon {
    pub fn serve(base: &Path) -> Self {
        let port = free_port();
        let child = Command::new("git")
            .arg("daemon")
            .arg("--reuseaddr")
            .arg("--export-all")
            .arg("--enable=receive-pack")
            .arg("--listen=127.0.0.1")
            .arg(format!("--port={port}"))
            .arg(format!("--base-path={}", base.display()))
            .arg(base)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start git daemon");
        let daemon = Self {
            _child: KillOnDrop(child),
            port,
        };
        wait_for_port(port);
        daemon
    }

    /// The `git://` URL of a repository below the base directory.
    pub fn url(&self, repo: &str) -> String {
        format!("git://127.0.0.1:{}/{repo}", self.port)
    }
}

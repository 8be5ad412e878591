//! Every Nix file of the project at least parses with the real Nix (nixpkgs, which evaluating
//! the module and the package needs, cannot be fetched on these machines).

use fleet_tests::nix::nix_env;
use fleet_tests::run;
use std::path::Path;
use std::process::Command;

fn nix_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if path.is_dir() && !name.starts_with('.') && name != "target" {
            nix_files(&path, out);
        } else if name.ends_with(".nix") {
            out.push(path);
        }
    }
}

#[test]
fn every_nix_file_parses() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut files = Vec::new();
    nix_files(root, &mut files);
    for expected in [
        "flake.nix",
        "package.nix",
        "nixos-module/fleet-agent.nix",
        "nixos-module/fleet-collector.nix",
        "nixos-module/tests/eval.nix",
        "vm-tests/default.nix",
        "vm-tests/switch-and-rollback.nix",
        "vm-tests/fleet.nix",
    ] {
        assert!(
            files.contains(&root.join(expected)),
            "{expected} is missing"
        );
    }
    for file in files {
        let mut command = Command::new("nix-instantiate");
        command.envs(nix_env()).arg("--parse").arg(&file);
        let out = run(command);
        assert_eq!(out.code, Some(0), "{}:\n{out}", file.display());
    }
}

# fleet for nixpkgs, under names nothing in nixpkgs uses (nixpkgs' `fleet` is fleetdm's server):
# `fleet-gitops` holds fleet-sign and fleet-agent (workstations, CI, the collector);
# `crate = "fleet-agent"` builds `fleet-gitops-agent`, the agent alone, for every host, so hosts
# carry neither fleet-sign nor its SQLite. `s3 = false` leaves cache+s3:// channels out of the
# agent (about 0.7 MB smaller and a lower idle RSS: docs/performance.md); fleet-sign keeps them.
{ lib, rustPlatform, pkg-config, zlib, crate ? null, s3 ? true }:

let
  crates = if crate == null then [ "fleet-agent" "fleet-sign" ] else [ crate ];
  packages = lib.concatMap (name: [ "-p" name ]) crates;
in
rustPlatform.buildRustPackage {
  pname = if crate == null then "fleet-gitops" else "fleet-gitops-agent";
  version = (lib.importTOML ./Cargo.toml).workspace.package.version;

  src = lib.fileset.toSource {
    root = ./.;
    # fleet-sign's unit tests parse the fleet.toml examples of its documentation.
    fileset = lib.fileset.unions [ ./Cargo.toml ./Cargo.lock ./agent ./signer ./tests ./docs/fleet-sign.md ];
  };
  cargoLock.lockFile = ./Cargo.lock;

  # libgit2 (built by libgit2-sys, without OpenSSL or libssh2) links the system's zlib, found
  # through pkg-config. TLS is rustls; SQLite is bundled into fleet-sign.
  nativeBuildInputs = [ pkg-config ];
  buildInputs = [ zlib ];
  cargoBuildFlags = packages;
  buildNoDefaultFeatures = !s3;
  checkNoDefaultFeatures = !s3;

  # The integration tests need root, real Nix stores and loopback servers: they run in this
  # repository's CI (scripts/test); the unit tests run here.
  cargoTestFlags = packages;

  meta = {
    description = "Pull-based GitOps for NixOS fleets: signed releases, health-gated commits, automatic rollback";
    license = with lib.licenses; [ mit asl20 ];
    mainProgram = if crate == null then "fleet-sign" else crate;
    platforms = lib.platforms.linux;
  };
}

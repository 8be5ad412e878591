# fleet for nixpkgs: fleet-agent and fleet-sign.
{ lib, rustPlatform, pkg-config, openssl }:

rustPlatform.buildRustPackage {
  pname = "fleet";
  version = "0.1.0";

  src = lib.fileset.toSource {
    root = ./.;
    fileset = lib.fileset.unions [ ./Cargo.toml ./Cargo.lock ./agent ./signer ./tests ];
  };
  cargoLock.lockFile = ./Cargo.lock;

  nativeBuildInputs = [ pkg-config ];
  buildInputs = [ openssl ];
  cargoBuildFlags = [ "-p" "fleet-agent" "-p" "fleet-sign" ];

  # The integration tests need root, real Nix stores and loopback servers: they run in this
  # repository's CI (scripts/test); the unit tests run here.
  cargoTestFlags = [ "-p" "fleet-agent" "-p" "fleet-sign" ];

  meta = {
    description = "Pull-based GitOps for NixOS fleets: signed releases, health-gated commits, automatic rollback";
    license = with lib.licenses; [ mit asl20 ];
    mainProgram = "fleet-agent";
    platforms = lib.platforms.linux;
  };
}

{
  description = "fleet: pull-based GitOps for NixOS fleets";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAllSystems = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
      packagesFor = pkgs: {
        fleet-gitops = pkgs.callPackage ./package.nix { };
        fleet-gitops-agent = pkgs.callPackage ./package.nix { crate = "fleet-agent"; };
        # Without cache+s3:// channels: about 0.7 MB smaller, 0.4 to 0.7 MiB less idle RSS.
        fleet-gitops-agent-no-s3 = pkgs.callPackage ./package.nix { crate = "fleet-agent"; s3 = false; };
      };
    in
    {
      # For a nixpkgs of your own; the modules below do not need it.
      overlays.default = final: _prev: packagesFor final;

      packages = forAllSystems (pkgs: packagesFor pkgs // {
        default = self.packages.${pkgs.stdenv.hostPlatform.system}.fleet-gitops;
      });

      # NixOS VM tests (vm-tests/): `nix flake check` on Linux with KVM.
      checks = forAllSystems (pkgs: import ./vm-tests { inherit pkgs self; });

      # The modules with this flake's packages as their defaults, passed in rather than through
      # nixpkgs.overlays, so hosts whose pkgs are shared and read-only (nixpkgs' readOnlyPkgs)
      # evaluate too.
      # A host whose channel is not in an S3 bucket gets the agent without S3 support, which
      # idles in less memory.
      nixosModules.default = { config, lib, pkgs, ... }:
        let
          own = self.packages.${pkgs.stdenv.hostPlatform.system};
          s3 = lib.hasPrefix "cache+s3://" config.services.fleet-agent.settings.channel;
        in
        {
          imports = [ ./nixos-module/fleet-agent.nix ./nixos-module/fleet-collector.nix ];
          services.fleet-agent.package = lib.mkDefault (if s3 then own.fleet-gitops-agent else own.fleet-gitops-agent-no-s3);
          services.fleet-collector.package = lib.mkDefault own.fleet-gitops;
        };
    };
}

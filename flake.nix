{
  description = "fleet: pull-based GitOps for NixOS fleets";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAllSystems = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in
    {
      overlays.default = final: _prev: {
        fleet = final.callPackage ./package.nix { };
      };

      packages = forAllSystems (pkgs: rec {
        fleet = pkgs.callPackage ./package.nix { };
        default = fleet;
      });

      nixosModules.default = {
        imports = [ ./nixos-module/fleet-agent.nix ./nixos-module/fleet-collector.nix ];
        nixpkgs.overlays = [ self.overlays.default ];
      };
    };
}

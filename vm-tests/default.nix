# NixOS VM tests (runNixOSTest): the only place this project meets real NixOS, its
# switch-to-configuration, its systemd units and its module system with real nixpkgs. They are
# the flake's `checks`: `nix flake check` (or `nix build .#checks.x86_64-linux.switch-and-rollback`)
# on Linux with KVM. They cannot run on the project's CI machines (no nixpkgs there); CI parses
# these files.
{ pkgs, self }:
{
  switch-and-rollback = pkgs.testers.runNixOSTest (import ./switch-and-rollback.nix { inherit self; });
  fleet = pkgs.testers.runNixOSTest (import ./fleet.nix { inherit self; });
}

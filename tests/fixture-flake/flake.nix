{
  description = "fleet test fixture: a host factory over an inventory, without nixpkgs";

  outputs = { self }:
    let
      inventory = import ./inventory.nix;
      mkSystem = import ./lib/mk-system.nix;
    in
    {
      nixosConfigurations = builtins.mapAttrs (name: host: mkSystem (host // { inherit name; })) inventory;
    };
}

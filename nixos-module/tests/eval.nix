# Evaluates services.fleet-agent and services.fleet-collector with nixpkgs' real module system
# (lib.evalModules from nixpkgs' lib) against stub declarations of the NixOS options the two
# modules touch, typed as NixOS types them, and a stub pkgs whose packages are named store paths.
# Nothing is built: the point is what the modules make of their options.
#
#   import ./eval.nix { lib = import <nixpkgs lib>; config = { services.fleet-agent = …; }; }
#
# returns the failed assertions and the parts of the system the tests look at (tests/it/module.rs).
# With `viaFlake = true` the modules come from the flake's own `nixosModules.default` (flake.nix
# evaluated against a stub nixpkgs), with `vmTest = "NAME"` the configuration is that VM test's
# node `vmNode` (vm-tests/), which imports the flake's module itself; the test's other nodes are
# evaluated too, as the `nodes` argument runNixOSTest gives every node and the test script.
{ lib, config ? { }, viaFlake ? false, vmTest ? null, vmNode ? "host" }:
let
  inherit (lib) mkOption types;

  # A package as the module system sees one: a derivation with a store path.
  package = name: {
    type = "derivation";
    inherit name;
    outPath = "/nix/store/${builtins.substring 0 32 (builtins.hashString "sha256" name)}-${name}";
    outputName = "out";
  };

  pkgs = {
    coreutils = package "coreutils";
    bash = package "bash";
    gnugrep = package "gnugrep";
    git = package "git";
    curl = package "curl";
    openssh = package "openssh";
    # A new store path for the same files, as nixpkgs' symlinkJoin makes.
    symlinkJoin = { name, paths, ... }: package "${name}-${builtins.hashString "sha256" (builtins.toJSON (map toString paths))}";
    fleet-gitops = package "fleet-gitops";
    fleet-gitops-agent = package "fleet-gitops-agent";
    # nixpkgs' formats.toml: its value type, and a file generated from the value (JSON here:
    # the tests render the settings themselves and hand them to `fleet-agent check-config`).
    formats.toml = { }: {
      type =
        let
          valueType = types.nullOr (types.oneOf [
            types.bool
            types.int
            types.float
            types.str
            types.path
            (types.attrsOf valueType)
            (types.listOf valueType)
          ]) // { description = "TOML value"; };
        in
        valueType;
      generate = name: value: builtins.toFile name (builtins.toJSON value);
    };
    # A build step as a file holding its script: its path changes whenever its inputs do.
    runCommand = name: _env: script: builtins.toFile name script;
    stdenv.hostPlatform.system = "x86_64-linux";
    # package.nix, as the flake calls it: the agent alone (with or without S3) or both binaries
    # (named apart from the pkgs attributes, so a test sees which one a module got).
    callPackage = _path: args: package (
      if !(args ? crate) then "flake-fleet-gitops"
      else if args.s3 or true then "flake-fleet-gitops-agent"
      else "flake-fleet-gitops-agent-no-s3");
    # The VM test as runNixOSTest receives it.
    testers.runNixOSTest = test: test;
  };

  # flake.nix's outputs against a nixpkgs that is this lib and the stub pkgs.
  flake =
    let
      nixpkgs = {
        inherit lib;
        legacyPackages = lib.genAttrs [ "x86_64-linux" "aarch64-linux" ] (_: pkgs);
      };
      self = (import ../../flake.nix).outputs { inherit self nixpkgs; };
    in
    self;
  vmTests = import ../../vm-tests { inherit pkgs; self = flake; };

  # systemd.services.<name>, with the options NixOS declares that the modules use.
  unitOption = types.oneOf [ types.bool types.int types.str types.path (types.listOf (types.oneOf [ types.bool types.int types.str types.path ])) ];
  service = types.submodule {
    options = {
      description = mkOption { type = types.str; default = ""; };
      wantedBy = mkOption { type = types.listOf types.str; default = [ ]; };
      wants = mkOption { type = types.listOf types.str; default = [ ]; };
      after = mkOption { type = types.listOf types.str; default = [ ]; };
      restartIfChanged = mkOption { type = types.bool; default = true; };
      stopIfChanged = mkOption { type = types.bool; default = true; };
      unitConfig = mkOption { type = types.attrsOf unitOption; default = { }; };
      serviceConfig = mkOption { type = types.attrsOf unitOption; default = { }; };
      path = mkOption { type = types.listOf (types.oneOf [ types.package types.str ]); default = [ ]; };
      environment = mkOption { type = types.attrsOf (types.nullOr (types.oneOf [ types.str types.path types.package ])); default = { }; };
    };
  };

  stubs = {
    options = {
      assertions = mkOption { type = types.listOf types.unspecified; default = [ ]; };
      warnings = mkOption { type = types.listOf types.str; default = [ ]; };
      networking.hostName = mkOption { type = types.str; default = "nixos"; };
      networking.proxy.envVars = mkOption { type = types.attrs; default = { }; };
      networking.firewall.allowedTCPPorts = mkOption { type = types.listOf types.port; default = [ ]; };
      # Set by the VM tests, read by nothing here but the stub toplevel.
      users = mkOption { type = types.submodule { freeformType = types.attrsOf types.anything; }; default = { }; };
      programs.git = mkOption { type = types.submodule { freeformType = types.attrsOf types.anything; }; default = { }; };
      services.openssh = mkOption { type = types.submodule { freeformType = types.attrsOf types.anything; }; default = { }; };
      services.nginx = mkOption { type = types.submodule { freeformType = types.attrsOf types.anything; }; default = { }; };
      systemd.tmpfiles.rules = mkOption { type = types.listOf types.str; default = [ ]; };
      system.build = mkOption { type = types.lazyAttrsOf types.unspecified; default = { }; };
      boot = mkOption { type = types.submodule { freeformType = types.attrsOf types.anything; }; default = { }; };
      virtualisation = mkOption { type = types.submodule { freeformType = types.attrsOf types.anything; }; default = { }; };
      specialisation = mkOption {
        type = types.attrsOf (types.submodule { options.configuration = mkOption { type = types.deferredModule; default = { }; }; });
        default = { };
      };
      programs.ssh.package = mkOption { type = types.package; default = pkgs.openssh; };
      nix.package = mkOption { type = types.package; default = package "nix"; };
      nix.settings = mkOption {
        type = types.submodule { freeformType = types.attrsOf types.anything; };
        default = { };
      };
      systemd.package = mkOption { type = types.package; default = package "systemd"; };
      systemd.services = mkOption { type = types.attrsOf service; default = { }; };
      systemd.timers = mkOption {
        type = types.attrsOf (types.submodule {
          options.wantedBy = mkOption { type = types.listOf types.str; default = [ ]; };
          options.timerConfig = mkOption { type = types.attrsOf unitOption; default = { }; };
        });
        default = { };
      };
      environment.systemPackages = mkOption { type = types.listOf types.package; default = [ ]; };
      environment.etc = mkOption {
        type = types.attrsOf (types.submodule ({ name, config, ... }: {
          options.text = mkOption { type = types.nullOr types.lines; default = null; };
          options.source = mkOption { type = types.path; };
          config.source = lib.mkIf (config.text != null) (lib.mkDefault (builtins.toFile (baseNameOf name) config.text));
        }));
        default = { };
      };
    };
  };

  # A system's toplevel: a store path that changes with what the tests can tell apart (files in
  # /etc, boot settings, the agent's command line), carrying those for the tests to read.
  toplevel = { config, ... }: {
    config.system.build.toplevel =
      let
        parts = {
          etc = lib.mapAttrs (_: file: file.text) config.environment.etc;
          boot = config.boot;
          agentExecStart = config.systemd.services.fleet-agent.serviceConfig.ExecStart or null;
        };
      in
      package "nixos-system-${config.networking.hostName}-${builtins.substring 0 8 (builtins.hashString "sha256" (builtins.toJSON parts))}"
      // { inherit parts; };
  };

  evalWith = extraArgs: modules: lib.evalModules {
    modules = [ stubs toplevel { _module.args = { inherit pkgs; } // extraArgs; } ] ++ modules;
  };
  # A VM test's nodes as runNixOSTest hands them to each node and to the test script.
  testNodes = test: lib.mapAttrs (name: node: (evalWith { nodes = testNodes test; } [ node ]).config) test.nodes;

  evaluated =
    if vmTest != null then evalWith { nodes = testNodes vmTests.${vmTest}; } [ vmTests.${vmTest}.nodes.${vmNode} ]
    else evalWith { } (if viaFlake then [ flake.nixosModules.default config ] else [ ../fleet-agent.nix ../fleet-collector.nix config ]);
  cfg = evaluated.config;
in
{
  failedAssertions = map (a: a.message) (lib.filter (a: !a.assertion) cfg.assertions);
  agent = cfg.systemd.services.fleet-agent or null;
  collector = cfg.systemd.services.fleet-collector or null;
  refresh = cfg.systemd.services.fleet-refresh or null;
  refreshTimer = cfg.systemd.timers.fleet-refresh or null;
  # The settings as the module renders them (it drops unset optional values: TOML has no null).
  settings =
    if cfg.services.fleet-agent.enable
    then lib.filterAttrsRecursive (_: value: value != null) cfg.services.fleet-agent.settings
    else null;
  # What fleet-sign reads for `tag:NAME` (config.services.fleet-agent.tags of each host).
  tags = cfg.services.fleet-agent.tags;
  etc = lib.mapAttrs (_: file: file.source) cfg.environment.etc;
  systemPackages = map (p: p.name) cfg.environment.systemPackages;
  firewall = cfg.networking.firewall.allowedTCPPorts;
  specialisations = builtins.attrNames cfg.specialisation;
  toplevel = cfg.system.build.toplevel.parts;
  # What the node's system.build holds besides the toplevel (a VM test's next systems).
  build = lib.mapAttrs (_: system: { path = toString system; parts = system.parts or null; })
    (removeAttrs cfg.system.build [ "toplevel" ]);
  vmTests = lib.mapAttrs
    (_: test: {
      inherit (test) name;
      nodes = builtins.attrNames test.nodes;
      script = if lib.isFunction test.testScript then test.testScript { nodes = testNodes test; } else test.testScript;
    })
    vmTests;
}

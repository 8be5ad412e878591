# services.fleet-agent: the agent on every host of the fleet.
#
# The agent pulls signed releases, substitutes its own system, tries it with
# switch-to-configuration test, and commits it only when healthy. It never listens on a socket.
{ config, lib, pkgs, ... }:
let
  cfg = config.services.fleet-agent;
  stateDir = cfg.settings.paths.state_dir or "/var/lib/fleet-agent";
  runtimeDir = cfg.settings.paths.runtime_dir or "/run/fleet-agent";
  settingsFormat = pkgs.formats.toml { };
  # TOML has no null: drop unset optional settings.
  settings = lib.filterAttrsRecursive (_: value: value != null) cfg.settings;
  configFile = settingsFormat.generate "fleet-agent.toml" settings;
  # Validated at build time, so a bad config fails nixos-rebuild instead of the host.
  checkedConfigFile = pkgs.runCommand "fleet-agent-checked.toml" { nativeBuildInputs = [ cfg.package ]; } ''
    fleet-agent check-config ${configFile}
    cp ${configFile} $out
  '';
  # The key bytes of a `name:base64` public key: the same key under two names is one key.
  keyBytes = key: lib.last (lib.splitString ":" key);
  secretOption = description: lib.mkOption {
    type = lib.types.nullOr lib.types.str;
    default = null;
    example = "/run/secrets/fleet-channel";
    description = "${description} A path outside the Nix store (the store is world-readable).";
  };
in
{
  options.services.fleet-agent = {
    enable = lib.mkEnableOption "fleet-agent, which pulls signed releases and keeps them only when healthy";

    # Not `fleet`: nixpkgs' `fleet` is fleetdm's server. The flake's nixosModules.default sets
    # this to its own package; without the flake, add its overlay or set it.
    package = lib.mkPackageOption pkgs "fleet-gitops-agent" { };

    environmentFile = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      example = "/run/secrets/fleet-s3";
      description = ''
        A file of `NAME=value` lines for the agent's environment (systemd's EnvironmentFile): the
        credentials of a `cache+s3://` channel (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
        `AWS_SESSION_TOKEN`). A path outside the Nix store (the store is world-readable).
      '';
    };

    tags = lib.mkOption {
      type = lib.types.listOf (lib.types.strMatching "[A-Za-z0-9._-]+");
      default = [ ];
      example = [ "canary" "pi" ];
      description = ''
        Labels for `fleet-sign`, which reads them from the flake: `--on tag:NAME` and
        `[rollout] waves` in fleet.toml select the hosts tagged NAME. The agent does not use them.
      '';
    };

    settings = lib.mkOption {
      description = ''
        The agent's configuration (docs/fleet-agent.md has every key), rendered to TOML and checked
        with `fleet-agent check-config` at build time.
      '';
      default = { };
      type = lib.types.submodule {
        freeformType = settingsFormat.type;
        options = {
          fleet = lib.mkOption {
            type = lib.types.str;
            example = "home";
            description = "The fleet this host belongs to; releases for another fleet are refused.";
          };
          host = lib.mkOption {
            type = lib.types.str;
            default = config.networking.hostName;
            defaultText = lib.literalExpression "config.networking.hostName";
            description = "This host's name in releases.";
          };
          trusted_keys = lib.mkOption {
            type = lib.types.listOf lib.types.str;
            example = [ "ops-2026:49SIOpjnGSp5r+SsncgIRf6j4OKvy4m67GEJc2oWQ3s=" ];
            description = "Release public keys this host trusts, as `fleet-sign keygen` prints them.";
          };
          threshold = lib.mkOption {
            type = lib.types.ints.positive;
            default = 1;
            description = "How many distinct trusted keys must have signed a release.";
          };
          freshness_keys = lib.mkOption {
            type = lib.types.listOf lib.types.str;
            default = [ ];
            example = [ "fresh-ci:5SO5A/3oRhOc7Gu5S3hwoRPaJLNITTyEeM8zxnnkNbk=" ];
            description = ''
              Freshness public keys. When set, a release also needs a freshness statement for
              exactly that release signed by one of them (`fleet-sign refresh`), and the
              statement's expiry replaces the release's own. Keys of their own, never release keys.
            '';
          };
          channel = lib.mkOption {
            type = lib.types.str;
            example = "git+https://git.example.org/fleet.git#fleet-release";
            description = "Where releases come from: a directory, an http(s) base URL, git+<url>[#<ref>], or cache+<binary cache URL> (the cache is then also the first substituter).";
          };
          realise = lib.mkOption {
            type = lib.types.enum [ "substitute" "substitute-or-build" ];
            default = "substitute";
            description = ''
              "substitute": fetch the system from binary caches only, never build.
              "substitute-or-build": build from the signed source commit when no cache has it
              (needs the RAM and time to evaluate the fleet on this host).
            '';
          };
          token_file = secretOption "A file holding a bearer token (http) or HTTPS password (git).";
          ssh_key_file = secretOption "An SSH deploy key for git+ssh channels.";
          ssh_known_hosts_file = lib.mkOption {
            type = lib.types.nullOr lib.types.str;
            default = null;
            description = "A known_hosts file with the git server's host key (git+ssh channels); unknown host keys are never accepted.";
          };
        };
      };
    };
  };

  config = lib.mkIf cfg.enable {
    assertions = [
      {
        assertion = cfg.settings.trusted_keys != [ ];
        message = "services.fleet-agent.settings.trusted_keys is empty: list the release public keys (fleet-sign keygen prints them).";
      }
      {
        assertion = lib.all (key: !(lib.elem (keyBytes key) (map keyBytes cfg.settings.trusted_keys))) cfg.settings.freshness_keys;
        message = "services.fleet-agent.settings.freshness_keys holds a release key (from trusted_keys): the freshness role needs a key of its own.";
      }
      {
        assertion = cfg.settings.threshold <= lib.length cfg.settings.trusted_keys;
        message = "services.fleet-agent.settings.threshold is above the number of trusted_keys: no release could ever be accepted.";
      }
      {
        assertion = lib.all (f: f == null || !lib.isStorePath f) [ cfg.settings.token_file cfg.settings.ssh_key_file cfg.environmentFile ];
        message = "services.fleet-agent.settings.token_file, ssh_key_file and services.fleet-agent.environmentFile must be paths outside the Nix store: the store is readable by every user.";
      }
      {
        assertion = config.nix.settings.require-sigs or true;
        message = "services.fleet-agent needs nix.settings.require-sigs = true: it refuses to install closures without Nix's signature checks.";
      }
      {
        assertion = lib.hasPrefix "/run/" runtimeDir && !lib.hasInfix ".." runtimeDir;
        message = "services.fleet-agent.settings.paths.runtime_dir must be below /run (it is the unit's RuntimeDirectory, on tmpfs), not ${runtimeDir}.";
      }
      {
        assertion = lib.hasPrefix "/var/lib/" stateDir && !lib.hasInfix ".." stateDir;
        message = "services.fleet-agent.settings.paths.state_dir must be below /var/lib (it is the unit's StateDirectory), not ${stateDir}.";
      }
    ];

    # fleet-agent only: fleet-sign (and its SQLite) stays on workstations and the collector.
    environment.systemPackages = [ cfg.package ];
    # For the CLI (`fleet-agent status` reads it by default); the daemon is given the checked
    # file's store path itself, so a settings change changes its unit.
    environment.etc."fleet-agent/config.toml".source = checkedConfigFile;

    systemd.services.fleet-agent = {
      description = "fleet-agent: pull, verify and apply signed NixOS releases";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];
      # The agent switches the system itself: a switch must never restart or stop it midway.
      # It picks up a new version of itself after the commit, at its next start.
      restartIfChanged = false;
      stopIfChanged = false;
      unitConfig.X-StopOnRemoval = false;
      # nix for realising, systemd-run for switching, ssh for git+ssh channels.
      path = [ config.nix.package config.systemd.package pkgs.coreutils config.programs.ssh.package ];
      # Channels, caches and the collector through the host's proxy, as system.autoUpgrade does.
      environment = config.networking.proxy.envVars;
      serviceConfig = {
        # Ready once the state is loaded; `systemctl status` shows the phase and release; a
        # runtime thread that stops feeding the watchdog is killed and restarted, and the
        # restarted agent resumes its cycle from the state file.
        Type = "notify";
        NotifyAccess = "main";
        WatchdogSec = "3min";
        # The checked config by its store path: a release that changes the settings changes
        # this line, and the agent restarts into it once the release is committed (never during
        # its trial: restartIfChanged = false). No ExecReload: SIGHUP means "poll now"
        # (`fleet-agent poll-now`), not "reread the config".
        ExecStart = "${lib.getExe' cfg.package "fleet-agent"} --config ${checkedConfigFile} run";
        Restart = "always";
        RestartSec = "10s";
        StateDirectory = lib.removePrefix "/var/lib/" stateDir;
        StateDirectoryMode = "0700";
        # agent.json, rewritten after every poll: on tmpfs, not the SD card.
        RuntimeDirectory = lib.removePrefix "/run/" runtimeDir;
        # A stop leaves a trial to the next start (the switch goes on in its own transient unit,
        # a health window is run again). With activation.mode = "direct" the switch is the
        # agent's own child: KillMode=mixed sends SIGTERM to the agent alone, which waits for
        # the switch to end (within TimeoutStopSec) before it exits.
        KillMode = "mixed";
        TimeoutStopSec = "15min";
      } // lib.optionalAttrs (cfg.environmentFile != null) {
        EnvironmentFile = cfg.environmentFile;
        # No hardening that would stop it: it runs switch-to-configuration (through
        # systemd-run) and writes the system profile, which needs root and a writable /nix.
      };
    };
  };
}

# services.fleet-collector: the one host that receives the fleet's signed health reports
# (`fleet-sign collect`), keeps the latest per host in SQLite and serves the fleet view
# (`fleet-sign status --collector URL`) and Prometheus metrics at /metrics.
#
# Hosts send reports outbound over HTTP, so they may sit behind NAT; only this host listens.
{ config, lib, pkgs, ... }:
let
  cfg = config.services.fleet-collector;
  port = lib.toInt (lib.last (lib.splitString ":" cfg.listen));
in
{
  options.services.fleet-collector = {
    enable = lib.mkEnableOption "fleet-collector, which receives and checks the fleet's signed reports";

    # fleet-sign; not `fleet`, which is fleetdm's server in nixpkgs. The flake's
    # nixosModules.default sets it to its own package.
    package = lib.mkPackageOption pkgs "fleet-gitops" { };

    fleet = lib.mkOption {
      type = lib.types.str;
      example = "home";
      description = "The fleet whose reports are accepted.";
    };

    channel = lib.mkOption {
      type = lib.types.str;
      example = "git+https://git.example.org/fleet.git#fleet-release";
      description = ''
        The release channel the hosts poll: the collector reads each host's report key from the
        newest release there that verifies with `trustedKeys`.
      '';
    };

    trustedKeys = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      example = [ "ops-2026:49SIOpjnGSp5r+SsncgIRf6j4OKvy4m67GEJc2oWQ3s=" ];
      description = "Release public keys, as the hosts trust them.";
    };

    threshold = lib.mkOption {
      type = lib.types.ints.positive;
      default = 1;
      description = "How many distinct trusted keys must have signed a release.";
    };

    listen = lib.mkOption {
      type = lib.types.str;
      default = "0.0.0.0:9400";
      description = "Address and port to listen on.";
    };

    openFirewall = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = "Open the listening port in the firewall.";
    };

    refresh = lib.mkOption {
      type = lib.types.str;
      default = "60s";
      description = "How often to look for a newer release in the channel.";
    };

    history = lib.mkOption {
      type = lib.types.ints.positive;
      default = 100;
      description = "Reports kept per host besides the latest.";
    };

    tokenFile = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      example = "/run/secrets/fleet-channel";
      description = ''
        A file holding the token of a private git+https channel, sent as the HTTPS password (the
        user from the URL, else `fleet`), as the agent's `token_file` is. Handed to the dynamic
        user through systemd's LoadCredential, so it may be readable by root alone; a path
        outside the Nix store.
      '';
    };

    sshKeyFile = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      example = "/run/secrets/fleet-deploy-key";
      description = "An SSH deploy key for a git+ssh channel (through LoadCredential; outside the Nix store).";
    };

    sshKnownHostsFile = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      description = "A known_hosts file with the git server's host key (git+ssh channels); unknown host keys are refused.";
    };
  };

  config = lib.mkIf cfg.enable {
    assertions = [
      {
        assertion = cfg.trustedKeys != [ ] && cfg.threshold <= lib.length cfg.trustedKeys;
        message = "services.fleet-collector.trustedKeys must hold at least `threshold` release keys.";
      }
      {
        assertion = lib.all (f: f == null || !lib.isStorePath f) [ cfg.tokenFile cfg.sshKeyFile ];
        message = "services.fleet-collector.tokenFile and sshKeyFile must be paths outside the Nix store: the store is readable by every user.";
      }
      {
        assertion = cfg.sshKeyFile == null || cfg.sshKnownHostsFile != null;
        message = "services.fleet-collector.sshKeyFile needs sshKnownHostsFile: the collector has no home and never accepts an unknown host key.";
      }
    ];

    networking.firewall.allowedTCPPorts = lib.mkIf cfg.openFirewall [ port ];

    systemd.services.fleet-collector = {
      description = "fleet-collector: signed health reports from the fleet";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];
      # git and ssh read git channels.
      path = [ pkgs.git config.programs.ssh.package ];
      # Credentials for a private channel, from LoadCredential below: git asks a credential
      # helper that reads the token, and ssh uses the deploy key and known_hosts.
      environment = lib.optionalAttrs (cfg.tokenFile != null) {
        GIT_CONFIG_COUNT = "1";
        GIT_CONFIG_KEY_0 = "credential.helper";
        GIT_CONFIG_VALUE_0 = ''!f() { user=; while read -r line; do case "$line" in username=*) user=1;; esac; done; [ -n "$user" ] || echo username=fleet; echo "password=$(cat "$CREDENTIALS_DIRECTORY/channel-token")"; }; f'';
      } // lib.optionalAttrs (cfg.sshKeyFile != null) {
        GIT_SSH_COMMAND = "ssh -i %d/ssh-key -o IdentitiesOnly=yes -o BatchMode=yes -o UserKnownHostsFile=%d/known-hosts -o StrictHostKeyChecking=yes";
      };
      serviceConfig = {
        ExecStart = lib.escapeShellArgs ([
          (lib.getExe' cfg.package "fleet-sign")
          "collect"
          "--fleet" cfg.fleet
          "--from" cfg.channel
          "--listen" cfg.listen
          "--database" "/var/lib/fleet-collector/fleet.db"
          "--threshold" (toString cfg.threshold)
          "--refresh" cfg.refresh
          "--history" (toString cfg.history)
        ] ++ lib.concatMap (key: [ "--key" key ]) cfg.trustedKeys);
        Restart = "always";
        RestartSec = "5s";
        LoadCredential =
          lib.optional (cfg.tokenFile != null) "channel-token:${cfg.tokenFile}"
          ++ lib.optional (cfg.sshKeyFile != null) "ssh-key:${cfg.sshKeyFile}"
          ++ lib.optional (cfg.sshKnownHostsFile != null) "known-hosts:${cfg.sshKnownHostsFile}";
        DynamicUser = true;
        StateDirectory = "fleet-collector";
        StateDirectoryMode = "0700";
        # It reads a channel, writes its database and answers HTTP: nothing else.
        ProtectSystem = "strict";
        ProtectHome = true;
        PrivateTmp = true;
        PrivateDevices = true;
        NoNewPrivileges = true;
        ProtectKernelTunables = true;
        ProtectKernelModules = true;
        ProtectControlGroups = true;
        RestrictAddressFamilies = [ "AF_INET" "AF_INET6" "AF_UNIX" ];
        RestrictNamespaces = true;
        LockPersonality = true;
        MemoryDenyWriteExecute = true;
        SystemCallArchitectures = "native";
        # A machine test reads a git:// channel under it (git included); git+ssh is not yet tested.
        SystemCallFilter = [ "@system-service" "~@privileged @resources" ];
        SystemCallErrorNumber = "EPERM";
        CapabilityBoundingSet = "";
        PrivateUsers = true;
        UMask = "0077";
        RestrictRealtime = true;
        RestrictSUIDSGID = true;
        ProtectHostname = true;
        ProtectClock = true;
        ProtectKernelLogs = true;
        ProtectProc = "invisible";
        ProcSubset = "pid";
        DevicePolicy = "closed";
        RemoveIPC = true;
      };
    };
  };
}

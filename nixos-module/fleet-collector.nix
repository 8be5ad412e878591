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
  };

  config = lib.mkIf cfg.enable {
    assertions = [
      {
        assertion = cfg.trustedKeys != [ ] && cfg.threshold <= lib.length cfg.trustedKeys;
        message = "services.fleet-collector.trustedKeys must hold at least `threshold` release keys.";
      }
    ];

    networking.firewall.allowedTCPPorts = lib.mkIf cfg.openFirewall [ port ];

    systemd.services.fleet-collector = {
      description = "fleet-collector: signed health reports from the fleet";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];
      # git and ssh read git channels.
      path = [ pkgs.git pkgs.openssh ];
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

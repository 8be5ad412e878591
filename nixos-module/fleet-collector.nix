# services.fleet-collector: the one host that receives the fleet's signed health reports
# (`fleet-sign collect`), keeps the latest per host in SQLite and serves the fleet view
# (`fleet-sign status --collector URL`) and Prometheus metrics at /metrics.
#
# Hosts send reports outbound over HTTP, so they may sit behind NAT; only this host listens.
{ config, lib, pkgs, ... }:
let
  cfg = config.services.fleet-collector;
  port = lib.toInt (lib.last (lib.splitString ":" cfg.listen));
  fresh = cfg.freshness;
  # Directory channels the refresh job writes to (git remotes need no local path).
  directories = lib.filter (c: lib.hasPrefix "/" c) fresh.channels
    ++ map (lib.removePrefix "file://") (lib.filter (lib.hasPrefix "file://") fresh.channels);
  # Credentials for a private channel, from LoadCredential: git asks a credential helper that
  # reads the token, and ssh uses the deploy key and known_hosts.
  gitEnvironment = lib.optionalAttrs (cfg.tokenFile != null) {
    GIT_CONFIG_COUNT = "1";
    GIT_CONFIG_KEY_0 = "credential.helper";
    GIT_CONFIG_VALUE_0 = ''!f() { user=; while read -r line; do case "$line" in username=*) user=1;; esac; done; [ -n "$user" ] || echo username=fleet; echo "password=$(cat "$CREDENTIALS_DIRECTORY/channel-token")"; }; f'';
  } // lib.optionalAttrs (cfg.sshKeyFile != null) {
    GIT_SSH_COMMAND = "ssh -i %d/ssh-key -o IdentitiesOnly=yes -o BatchMode=yes -o UserKnownHostsFile=%d/known-hosts -o StrictHostKeyChecking=yes";
  };
  # Credentials from the environment (a cache+s3:// channel's), read by systemd.
  environmentFile = lib.optionalAttrs (cfg.environmentFile != null) { EnvironmentFile = cfg.environmentFile; };
  # A private CA for https channels (and git over https), besides the system's trust store.
  caEnvironment = lib.optionalAttrs (cfg.caFile != null) { FLEET_CA_FILE = toString cfg.caFile; };
  channelCredentials =
    lib.optional (cfg.tokenFile != null) "channel-token:${cfg.tokenFile}"
    ++ lib.optional (cfg.sshKeyFile != null) "ssh-key:${cfg.sshKeyFile}"
    ++ lib.optional (cfg.sshKnownHostsFile != null) "known-hosts:${cfg.sshKnownHostsFile}";
  # The sandbox both units share: they read (and the refresh job publishes to) a channel.
  sandbox = {
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
    SystemCallArchitectures = "native";
  };
  trustFlags = [ "--threshold" (toString cfg.threshold) ]
    ++ lib.concatMap (key: [ "--key" key ]) cfg.trustedKeys;
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

    environmentFile = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      example = "/run/secrets/fleet-s3";
      description = "A file of NAME=value lines for collect and refresh (systemd's EnvironmentFile, read by systemd before the dynamic user exists): the AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY of a cache+s3:// channel. Outside the Nix store.";
    };

    caFile = lib.mkOption {
      type = lib.types.nullOr (lib.types.either lib.types.path lib.types.str);
      default = null;
      example = "/etc/ssl/private-ca.pem";
      description = "PEM certificates trusted besides the system's store (security.pki) for https channels, git over https and S3 endpoints: a home forge or company CA.";
    };

    sshKnownHostsFile = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      description = "A known_hosts file with the git server's host key (git+ssh channels); unknown host keys are refused.";
    };

    freshness = {
      keys = lib.mkOption {
        type = lib.types.listOf lib.types.str;
        default = [ ];
        example = [ "fresh-ci:5SO5A/3oRhOc7Gu5S3hwoRPaJLNITTyEeM8zxnnkNbk=" ];
        description = ''
          The freshness public keys the hosts trust (their `freshness_keys`). The fleet view and
          `/metrics` (`fleet_release_valid_until_timestamp_seconds`) then show when the
          release's freshness statement expires, and `fleet-sign status` warns ahead of it.
        '';
      };
      keyFile = lib.mkOption {
        type = lib.types.nullOr lib.types.str;
        default = null;
        example = "/run/secrets/fleet-freshness-key";
        description = ''
          The secret freshness key (`fleet-sign keygen`). When set, a timer runs
          `fleet-sign refresh` on `channels`, so the fleet stays fresh without the release keys.
          Handed to the job through LoadCredential; a path outside the Nix store.
        '';
      };
      channels = lib.mkOption {
        type = lib.types.listOf lib.types.str;
        default = [ cfg.channel ];
        defaultText = lib.literalExpression "[ config.services.fleet-collector.channel ]";
        description = "The channels to refresh: directories or git remotes that fleet-sign can publish to (not http URLs).";
      };
      interval = lib.mkOption {
        type = lib.types.str;
        default = "hourly";
        description = "When the refresh job runs (systemd OnCalendar). A statement with more than half its lifetime left is left alone, so running often costs nothing.";
      };
      expires = lib.mkOption {
        type = lib.types.str;
        default = "7d";
        description = "How long each new statement stays valid (at most 31d).";
      };
    };
  };

  config = lib.mkIf cfg.enable {
    assertions = [
      {
        assertion = cfg.trustedKeys != [ ] && cfg.threshold <= lib.length cfg.trustedKeys;
        message = "services.fleet-collector.trustedKeys must hold at least `threshold` release keys.";
      }
      {
        assertion = lib.all (f: f == null || !lib.isStorePath f) [ cfg.tokenFile cfg.sshKeyFile cfg.environmentFile ];
        message = "services.fleet-collector.tokenFile, sshKeyFile and environmentFile must be paths outside the Nix store: the store is readable by every user.";
      }
      {
        assertion = cfg.sshKeyFile == null || cfg.sshKnownHostsFile != null;
        message = "services.fleet-collector.sshKeyFile needs sshKnownHostsFile: the collector has no home and never accepts an unknown host key.";
      }
      {
        assertion = fresh.keyFile == null || !lib.isStorePath fresh.keyFile;
        message = "services.fleet-collector.freshness.keyFile must be a path outside the Nix store: the store is readable by every user.";
      }
      {
        assertion = fresh.keyFile == null || lib.all (c: !(lib.hasPrefix "http://" c || lib.hasPrefix "https://" c)) fresh.channels;
        message = "services.fleet-collector.freshness.channels must be directories or git remotes: fleet-sign cannot publish to an http URL (refresh the directory it serves).";
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
      environment = gitEnvironment // caEnvironment;
      serviceConfig = {
        ExecStart = lib.escapeShellArgs ([
          (lib.getExe' cfg.package "fleet-sign")
          "collect"
          "--fleet" cfg.fleet
          "--from" cfg.channel
          "--listen" cfg.listen
          "--database" "/var/lib/fleet-collector/fleet.db"
          "--refresh" cfg.refresh
          "--history" (toString cfg.history)
        ] ++ trustFlags ++ lib.concatMap (key: [ "--freshness-key" key ]) fresh.keys);
        Restart = "always";
        RestartSec = "5s";
        LoadCredential = channelCredentials;
        DynamicUser = true;
        StateDirectory = "fleet-collector";
        StateDirectoryMode = "0700";
      } // sandbox // environmentFile // {
        # It reads a channel, writes its database and answers HTTP: nothing else.
        MemoryDenyWriteExecute = true;
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

    # `fleet-sign refresh` on a timer: renews the freshness statement of the release in each
    # channel with the freshness key alone (the release keys stay offline).
    systemd.services.fleet-refresh = lib.mkIf (fresh.keyFile != null) {
      description = "fleet-refresh: keep the fleet's release fresh";
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];
      path = [ pkgs.git config.programs.ssh.package ];
      environment = gitEnvironment // caEnvironment;
      serviceConfig = {
        Type = "oneshot";
        ExecStart = lib.escapeShellArgs ([
          (lib.getExe' cfg.package "fleet-sign")
          "refresh"
          "--fleet" cfg.fleet
          "--freshness-key" "%d/freshness-key"
          "--expires" fresh.expires
          "--threshold" (toString cfg.threshold)
        ] ++ lib.concatMap (key: [ "--trusted-key" key ]) cfg.trustedKeys
          ++ lib.concatMap (channel: [ "--channel" channel ]) fresh.channels);
        LoadCredential = [ "freshness-key:${fresh.keyFile}" ] ++ channelCredentials;
        # A directory channel belongs to whoever serves it: the job writes there as root,
        # confined to those directories; git remotes need no local writes.
        DynamicUser = directories == [ ];
        ReadWritePaths = directories;
        UMask = "0022";
      } // sandbox // environmentFile;
    };
    systemd.timers.fleet-refresh = lib.mkIf (fresh.keyFile != null) {
      wantedBy = [ "timers.target" ];
      timerConfig = {
        OnCalendar = fresh.interval;
        Persistent = true;
        RandomizedDelaySec = "5m";
      };
    };
  };
}

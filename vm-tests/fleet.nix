# A small fleet as an operator runs one: a server holding the binary cache (a file:// cache that
# fleet-sign pushes to, served over HTTP by nginx), the release channel (a git repository the
# hosts reach over SSH with a deploy key, and a directory the collector reads) and the collector;
# two hosts running fleet-agent from the module.
#
# The releases carry systems the hosts do not have: each host's next system is its own
# configuration extended (extendModules, as specialisations are made) and lives only in the
# server's store, so the hosts must substitute it from the cache. host1's next system also
# changes the agent's package and settings: the agent must commit it without restarting during
# the trial, then restart itself into the new package and config. host2 allows reboots
# (`reboot = "auto"`) and its next system changes the initrd, so it boots into it with a real boot
# loader and commits after the boot. Both report to the collector, which then counts both
# committed and healthy. Last, host1 refuses a release whose closure is in a cache signed by a key
# its Nix does not trust, and fetches none of it.
{ self }:
let
  nextVersion = { lib, ... }: {
    environment.etc."fleet-version".text = lib.mkForce "2";
  };

  hostNode = { hostName, extra, next }: { config, lib, pkgs, extendModules, ... }: {
    imports = [ self.nixosModules.default extra ];
    networking.hostName = hostName;
    # Substituted paths must survive a reboot: the writable store on the VM's disk.
    virtualisation.writableStoreUseTmpfs = false;
    environment.etc."fleet-version".text = "1";
    nix.settings = {
      substituters = lib.mkForce [ ];
      trusted-public-keys = [ (lib.fileContents ./keys/cache.pub) ];
    };
    services.fleet-agent = {
      enable = true;
      settings = {
        fleet = "vm";
        trusted_keys = [ (lib.fileContents ./keys/release.sec.pub) ];
        channel = "git+ssh://git@server/srv/fleet.git#fleet-release";
        # Put there by the test script (secrets never go into the store).
        ssh_key_file = "/var/lib/fleet-secrets/deploy-key";
        ssh_known_hosts_file = "/var/lib/fleet-secrets/known_hosts";
        substituters = [ "http://server" ];
        poll_interval = "5s";
        poll_splay = "0s";
        health = {
          window = "5s";
          interval = "1s";
        };
        report = {
          url = "http://server:9400";
          heartbeat = "10s";
        };
      };
    };
    # The system the release will carry, built with the test but never part of this host's
    # own closure.
    system.build.fleetNext = (extendModules { modules = [ nextVersion next ]; }).config.system.build.toplevel;
    # One more, which the test pushes to a cache signed by a key the hosts do not trust.
    system.build.fleetUntrusted = (extendModules {
      modules = [ ({ lib, ... }: { environment.etc."fleet-version".text = lib.mkForce "untrusted"; }) ];
    }).config.system.build.toplevel;
  };

  # What the flake's module gives a host whose channel is not in an S3 bucket.
  agentPackage = pkgs: self.packages.${pkgs.stdenv.hostPlatform.system}.fleet-gitops-agent-no-s3;
in
{
  name = "fleet-cache-git-ssh-collector";

  nodes = {
    server = { lib, pkgs, nodes, ... }: {
      imports = [ self.nixosModules.default ];
      environment.systemPackages = [ self.packages.${pkgs.stdenv.hostPlatform.system}.fleet-gitops pkgs.git pkgs.curl ];
      nix.settings.experimental-features = [ "nix-command" "flakes" ];
      # The systems to release: in this store only.
      virtualisation.additionalPaths = [
        nodes.host1.system.build.fleetNext
        nodes.host2.system.build.fleetNext
        nodes.host1.system.build.fleetUntrusted
      ];
      systemd.tmpfiles.rules = [
        "d /srv/cache 0755 root root -"
        "d /srv/release 0755 root root -"
      ];
      services.nginx = {
        enable = true;
        virtualHosts.server.root = "/srv/cache";
        appendHttpConfig = "access_log /var/log/nginx/cache.log;";
      };
      # The hosts' deploy key reads the release repository through git-shell, nothing else.
      users.groups.git = { };
      users.users.git = {
        isSystemUser = true;
        group = "git";
        home = "/var/empty";
        shell = "${pkgs.git}/bin/git-shell";
        openssh.authorizedKeys.keyFiles = [ ./keys/deploy.pub ];
      };
      services.openssh.enable = true;
      # The repository belongs to root, who publishes; git-shell reads it as `git`.
      programs.git = {
        enable = true;
        config.safe.directory = "*";
      };
      services.fleet-collector = {
        enable = true;
        fleet = "vm";
        channel = "/srv/release";
        trustedKeys = [ (lib.fileContents ./keys/release.sec.pub) ];
        refresh = "5s";
        openFirewall = true;
      };
      networking.firewall.allowedTCPPorts = [ 80 ];
    };

    host1 = hostNode {
      hostName = "host1";
      extra = { };
      # The agent updates itself (a new package path, the same program) and its settings.
      next = { lib, pkgs, ... }: {
        services.fleet-agent.package = lib.mkForce (pkgs.symlinkJoin {
          name = "fleet-gitops-agent-next";
          paths = [ (agentPackage pkgs) ];
        });
        services.fleet-agent.settings.health.checks = [{
          name = "next settings";
          type = "command";
          command = [ "${pkgs.coreutils}/bin/true" ];
        }];
      };
    };

    host2 = hostNode {
      hostName = "host2";
      extra = {
        virtualisation.useBootLoader = true;
        virtualisation.useEFIBoot = true;
        boot.loader.systemd-boot.enable = true;
        boot.loader.efi.canTouchEfiVariables = true;
        services.fleet-agent.settings.activation.reboot = "auto";
      };
      # Another initrd: the release needs a reboot.
      next = { ... }: {
        boot.initrd.kernelModules = [ "dm-snapshot" ];
      };
    };
  };

  testScript = { nodes, ... }:
    let
      next1 = nodes.host1.system.build.fleetNext;
      next2 = nodes.host2.system.build.fleetNext;
      untrusted = nodes.host1.system.build.fleetUntrusted;
    in
    ''
      import json

      hosts = [host1, host2]
      nexts = {"host1": "${next1}", "host2": "${next2}"}

      start_all()
      server.wait_for_unit("sshd.service")
      server.wait_for_unit("nginx.service")
      server.wait_for_unit("fleet-collector.service")
      server.succeed("git init --bare --initial-branch=main /srv/fleet.git")
      host_key = " ".join(server.succeed("cat /etc/ssh/ssh_host_ed25519_key.pub").split()[:2])

      def state(h):
          return json.loads(h.succeed("cat /var/lib/fleet-agent/state.json"))

      def resolve(h, path):
          return h.succeed(f"readlink -f {path}").strip()

      def generations(h):
          return int(h.succeed("ls -d /nix/var/nix/profiles/system-*-link | wc -l").strip())

      before = {}
      identities = {}
      for h in hosts:
          h.wait_for_unit("fleet-agent.service")
          h.succeed("install -d -m 700 /var/lib/fleet-secrets")
          h.succeed("install -m 600 ${./keys/deploy} /var/lib/fleet-secrets/deploy-key")
          h.succeed(f"echo 'server {host_key}' > /var/lib/fleet-secrets/known_hosts")
          identities[h.name] = h.succeed("fleet-agent identity").strip()
          # The next system is nowhere on the host yet.
          h.fail(f"nix-store --check-validity {nexts[h.name]}")
          before[h.name] = (resolve(h, "/run/current-system"), generations(h))
      invocation1 = host1.succeed("systemctl show -P InvocationID fleet-agent.service").strip()

      with subtest("fleet-sign releases both hosts into the cache and the git channel"):
          server.succeed("install -d -m 700 /root/fleet /root/fleet/keys /root/fleet/flake")
          server.succeed("install -m 600 ${./keys/release.sec} /root/fleet/keys/release.sec")
          server.succeed("install -m 600 ${./keys/cache.sec} /root/fleet/keys/cache.sec")
          # fleet-sign reads only the host list from the flake when given --paths.
          server.succeed(
              "cat > /root/fleet/flake/flake.nix <<'EOF'\n"
              + "{ outputs = _: { nixosConfigurations = { host1 = { }; host2 = { }; }; }; }\n"
              + "EOF"
          )
          server.succeed(
              "cat > /root/fleet/fleet.toml <<'EOF'\n"
              + 'fleet = "vm"\n'
              + 'flake = "flake"\n'
              + 'keys = ["keys/release.sec"]\n'
              + 'cache = "file:///srv/cache"\n'
              + 'cache_key = "keys/cache.sec"\n'
              + 'channels = ["/srv/release", "git+file:///srv/fleet.git#fleet-release"]\n'
              + f'[hosts.host1]\nreport_key = "{identities["host1"]}"\n'
              + f'[hosts.host2]\nreport_key = "{identities["host2"]}"\n'
              + "EOF"
          )
          server.succeed(
              "cd /root/fleet && git config --global user.email ops@vm && git config --global user.name ops && "
              + f"fleet-sign release --allow-dirty --paths host1={nexts['host1']},host2={nexts['host2']}"
          )
          server.succeed("ls /srv/cache/*.narinfo")
          server.succeed("git --git-dir=/srv/fleet.git cat-file -e fleet-release:release.json")

      with subtest("host1 substitutes, commits, and only then restarts into its new package and settings"):
          host1.wait_until_succeeds(f"grep -q '\"last_good\": \"{nexts['host1']}\"' /var/lib/fleet-agent/state.json", timeout=300)
          assert resolve(host1, "/run/current-system") == nexts["host1"]
          assert resolve(host1, "/nix/var/nix/profiles/system") == nexts["host1"]
          assert generations(host1) == before["host1"][1] + 1
          host1.succeed("grep -qx 2 /etc/fleet-version")
          host1.succeed(f"nix-store --check-validity {nexts['host1']}")
          # The cache was asked for it (over HTTP, by this host).
          server.succeed("grep -q 'GET /nix-cache-info' /var/log/nginx/cache.log")
          server.succeed("grep -q 'GET /nar/' /var/log/nginx/cache.log")
          # The commit was logged by the agent that ran the trial: no restart before it.
          host1.succeed(f"journalctl _SYSTEMD_INVOCATION_ID={invocation1} | grep -q 'release 1 committed'")
          # Then it restarted into the new package, with the new checked config.
          host1.wait_until_succeeds(
              f"test \"$(systemctl show -P InvocationID fleet-agent.service)\" != {invocation1}", timeout=120
          )
          host1.wait_for_unit("fleet-agent.service")
          cmdline = host1.succeed("tr '\\0' ' ' < /proc/$(systemctl show -P MainPID fleet-agent.service)/cmdline")
          assert "fleet-gitops-agent-next" in cmdline, cmdline
          config = resolve(host1, "/etc/fleet-agent/config.toml")
          assert config in cmdline, (config, cmdline)
          host1.succeed(f"grep -q 'next settings' {config}")
          # And it keeps the release committed, with nothing to do.
          host1.sleep(10)
          s = state(host1)
          assert s["last_good"] == nexts["host1"] and "bad" not in s, s

      with subtest("host2 boots into a release that changes its initrd and commits it after the boot"):
          # The agent reboots the machine itself: with the driver's -no-reboot, the VM stops.
          host2.wait_for_shutdown()
          host2.start()
          host2.wait_for_unit("fleet-agent.service")
          host2.wait_until_succeeds(f"grep -q '\"last_good\": \"{nexts['host2']}\"' /var/lib/fleet-agent/state.json", timeout=300)
          assert resolve(host2, "/run/booted-system") == nexts["host2"]
          assert resolve(host2, "/nix/var/nix/profiles/system") == nexts["host2"]
          assert generations(host2) == before["host2"][1] + 1
          host2.succeed("grep -qx 2 /etc/fleet-version")
          host2.succeed("journalctl -u fleet-agent.service | grep -q 'release 1 committed'")

      with subtest("the collector counts both hosts committed and healthy"):
          for name in ["host1", "host2"]:
              server.wait_until_succeeds(
                  f"curl -sf http://localhost:9400/metrics | grep -q 'fleet_host_up_to_date{{host=\"{name}\"}} 1'",
                  timeout=120,
              )
              server.succeed(f"curl -sf http://localhost:9400/metrics | grep -q 'fleet_host_healthy{{host=\"{name}\"}} 1'")
          out = json.loads(server.succeed("fleet-sign status --collector http://localhost:9400 --json"))
          assert len(out["hosts"]) == 2, out

      with subtest("a closure signed by a key the host does not trust is refused, nothing fetched"):
          # The same release flow into another cache (served under /untrusted), signed by a
          # cache key of the operator's that the hosts' Nix does not trust.
          server.succeed("nix-store --generate-binary-cache-key other /root/fleet/keys/other.sec /root/fleet/other.pub")
          server.succeed("chmod 600 /root/fleet/keys/other.sec")
          server.succeed(
              "sed -e 's|file:///srv/cache|file:///srv/cache/untrusted|' -e 's|keys/cache.sec|keys/other.sec|' "
              + "/root/fleet/fleet.toml > /root/fleet/untrusted.toml && "
              + "echo 'substituters = [\"http://server/untrusted\"]' | sed -i '/^channels/r /dev/stdin' /root/fleet/untrusted.toml"
          )
          server.succeed("cd /root/fleet && fleet-sign release --config untrusted.toml --allow-dirty --paths host1=${untrusted}")
          host1.succeed("fleet-agent poll-now")
          host1.wait_until_succeeds("grep -q closure_untrusted /var/lib/fleet-agent/state.json", timeout=120)
          assert resolve(host1, "/run/current-system") == nexts["host1"]
          assert generations(host1) == before["host1"][1] + 1
          host1.fail("nix-store --check-validity ${untrusted}")
          host1.succeed("grep -qx 2 /etc/fleet-version")
          server.fail("grep -q 'GET /untrusted/nar/' /var/log/nginx/cache.log")
          host1.succeed("journalctl -u fleet-agent.service | grep -q closure_untrusted")
    '';
}

# One NixOS host running fleet-agent from the module, its releases published to a directory
# channel on the host itself by fleet-sign. The systems released are the host's own
# specialisations, real NixOS toplevels already in its store: "good" changes a file in /etc,
# "bad" adds a unit that fails. It checks: a good release is tried with the real
# switch-to-configuration, committed (one more generation of the system profile, the boot
# default set by the real boot loader code), a bad one rolled back with the host on its last good
# system, a release signed by an unknown key refused with nothing changed, and the agent's
# journal naming each outcome.
{ self }:
{
  name = "fleet-switch-and-rollback";

  nodes.host = { lib, pkgs, ... }: {
    imports = [ self.nixosModules.default ];
    environment.etc."fleet-version".text = "1";
    specialisation = {
      good.configuration = {
        environment.etc."fleet-version".text = lib.mkForce "2";
      };
      bad.configuration = {
        environment.etc."fleet-version".text = lib.mkForce "3";
        # Fails as soon as the system is activated: the switch reports it, or the built-in
        # failed-units check does.
        systemd.services.fleet-vm-test-broken = {
          wantedBy = [ "multi-user.target" ];
          serviceConfig = {
            Type = "oneshot";
            ExecStart = "${pkgs.coreutils}/bin/false";
          };
        };
      };
    };
    # The operator's tool, to publish releases in this test.
    environment.systemPackages = [ self.packages.${pkgs.stdenv.hostPlatform.system}.fleet-gitops ];
    services.fleet-agent = {
      enable = true;
      settings = {
        fleet = "vm";
        trusted_keys = [ (lib.fileContents ./keys/release.sec.pub) ];
        channel = "/var/lib/fleet-channel";
        poll_interval = "5s";
        poll_splay = "0s";
        health = {
          window = "5s";
          interval = "1s";
        };
      };
    };
  };

  testScript = ''
    import json

    host.start()
    host.wait_for_unit("fleet-agent.service")
    host.succeed("install -m 600 ${./keys/release.sec} /root/release.sec")
    host.succeed("mkdir -p /var/lib/fleet-channel")

    def resolve(path):
        return host.succeed(f"readlink -f {path}").strip()

    def state():
        return json.loads(host.succeed("cat /var/lib/fleet-agent/state.json"))

    def generations():
        return int(host.succeed("ls -d /nix/var/nix/profiles/system-*-link | wc -l").strip())

    def publish(serial, toplevel, key="/root/release.sec"):
        now = int(host.succeed("date +%s").strip())
        document = {
            "format": 1,
            "fleet": "vm",
            "serial": serial,
            "issued_at": now - 60,
            "expires": now + 3600,
            "source": {"repo": "vm-test", "commit": None},
            "substituters": [],
            "hosts": {"host": {"toplevel": toplevel}},
        }
        host.succeed(
            "cat > /var/lib/fleet-channel/release.json <<'EOF'\n"
            + json.dumps(document, indent=2)
            + "\nEOF"
        )
        host.succeed("rm -f /var/lib/fleet-channel/release.json.sig")
        host.succeed(f"fleet-sign sign --channel /var/lib/fleet-channel --fleet vm --key {key}")
        host.succeed("fleet-agent poll-now")

    first = resolve("/run/current-system")
    good = resolve("/run/current-system/specialisation/good")
    bad = resolve("/run/current-system/specialisation/bad")
    before = generations()

    with subtest("a good release is tried, healthy and committed"):
        publish(1, good)
        host.wait_until_succeeds(f"grep -q '\"last_good\": \"{good}\"' /var/lib/fleet-agent/state.json", timeout=180)
        assert resolve("/run/current-system") == good
        assert resolve("/nix/var/nix/profiles/system") == good
        assert generations() == before + 1, "the profile got one generation"
        host.succeed("grep -qx 2 /etc/fleet-version")
        host.succeed("journalctl -u fleet-agent.service | grep -q 'release 1 committed'")

    with subtest("a release that leaves a unit failed is rolled back"):
        publish(2, bad)
        host.wait_until_succeeds(
            "grep -q '\"serial\": 2' /var/lib/fleet-agent/state.json && "
            + "grep -q '\"bad\": {' /var/lib/fleet-agent/state.json",
            timeout=180,
        )
        s = state()
        assert s["bad"]["serial"] == 2, s
        assert s["bad"]["code"] in ("switch_failed", "health_failed"), s
        assert s["last_good"] == good, s
        assert resolve("/run/current-system") == good
        assert resolve("/nix/var/nix/profiles/system") == good
        assert generations() == before + 1, "the rollback made no generation"
        host.succeed("grep -qx 2 /etc/fleet-version")

    with subtest("a release signed by an unknown key is refused and changes nothing"):
        host.succeed("fleet-sign keygen intruder --out /root/intruder.sec")
        publish(3, bad, key="/root/intruder.sec")
        host.wait_until_succeeds(
            "grep -q signature_untrusted /var/lib/fleet-agent/state.json", timeout=60
        )
        assert resolve("/run/current-system") == good
        assert generations() == before + 1

    with subtest("the agent's status says where the host is"):
        out = host.succeed("fleet-agent status")
        assert good in out, out
        host.succeed(f"test {first} != {good}")
  '';
}

# One NixOS host running fleet-agent from the module, its releases published to a directory
# channel on the host itself by fleet-sign. The systems released are the host's own
# specialisations, real NixOS toplevels already in its store (so nothing is substituted here):
# "good" changes a file in /etc, "bad" adds a unit that fails, "sick" fails the configured
# health check, "slow" takes 20 s to start a unit during its switch. It checks, with the real
# switch-to-configuration and systemd: a good release committed (one more generation of the
# system profile); rollbacks on a failed unit and on a failed health check; refusals (unknown
# key, tampered document, wrong fleet, expired, a serial below the accepted one) with nothing
# changed; a restart of the agent during a switch that NixOS runs with a daemon-reload; and a
# power cut during a trial, after which the host boots its last committed system and does not
# try the release again.
{ self }:
{
  name = "fleet-switch-and-rollback";

  nodes.host = { lib, pkgs, ... }: {
    imports = [ self.nixosModules.default ];
    # A real boot loader on a real disk, so a commit's boot default is what the next boot runs
    # (and the agent's check of it reads systemd-boot's own entries).
    virtualisation.useBootLoader = true;
    virtualisation.useEFIBoot = true;
    boot.loader.systemd-boot.enable = true;
    boot.loader.efi.canTouchEfiVariables = true;
    environment.etc."fleet-version".text = "1";
    specialisation = {
      good.configuration = {
        environment.etc."fleet-version".text = lib.mkForce "2";
      };
      sick.configuration = {
        environment.etc."fleet-version".text = lib.mkForce "sick";
      };
      slow.configuration = {
        environment.etc."fleet-version".text = lib.mkForce "slow";
        systemd.services.fleet-vm-test-slow = {
          wantedBy = [ "multi-user.target" ];
          serviceConfig = {
            Type = "oneshot";
            RemainAfterExit = true;
            ExecStart = "${pkgs.coreutils}/bin/sleep 20";
          };
        };
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
          checks = [{
            name = "not sick";
            type = "command";
            command = [ "${pkgs.bash}/bin/sh" "-c" "! ${pkgs.gnugrep}/bin/grep -qx sick /etc/fleet-version" ];
          }];
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

    def publish(serial, toplevel, key="/root/release.sec", fleet="vm", expires_in=3600, then="true"):
        # fleet-sign sign publishes, then says whether hosts will take it (an expired release
        # is published and reported as not verifying, so its exit status is not checked here).
        now = int(host.succeed("date +%s").strip())
        document = {
            "format": 1,
            "fleet": fleet,
            "serial": serial,
            "issued_at": now - 7200,
            "expires": now + expires_in,
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
        # `then` runs right after the signing, before the agent is asked to poll.
        host.execute(f"fleet-sign sign --channel /var/lib/fleet-channel --fleet {fleet} --key {key}; {then}")
        host.succeed("test -s /var/lib/fleet-channel/release.json.sig")
        host.succeed("fleet-agent poll-now")

    def refused(code):
        host.wait_until_succeeds(
            f"grep -q '\"code\": \"{code}\"' /var/lib/fleet-agent/state.json", timeout=60
        )
        assert resolve("/run/current-system") == good
        assert generations() == before + 1

    first = resolve("/run/current-system")
    good = resolve("/run/current-system/specialisation/good")
    bad = resolve("/run/current-system/specialisation/bad")
    sick = resolve("/run/current-system/specialisation/sick")
    slow = resolve("/run/current-system/specialisation/slow")
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

    with subtest("a release that fails its health check is rolled back"):
        publish(3, sick)
        host.wait_until_succeeds(
            "grep -q '\"serial\": 3,' /var/lib/fleet-agent/state.json && "
            + "grep -q health_failed /var/lib/fleet-agent/state.json",
            timeout=180,
        )
        s = state()
        assert s["bad"]["serial"] == 3 and s["bad"]["code"] == "health_failed", s
        assert resolve("/run/current-system") == good
        host.succeed("grep -qx 2 /etc/fleet-version")

    with subtest("refusals change nothing"):
        host.succeed("fleet-sign keygen intruder --out /root/intruder.sec")
        publish(4, bad, key="/root/intruder.sec")
        refused("signature_untrusted")
        publish(4, bad, fleet="lab")
        refused("wrong_fleet")
        publish(4, bad, expires_in=-60)
        refused("expired")
        publish(2, bad)
        refused("serial_too_low")
        # Signed, then changed: a tampered document.
        publish(4, bad, then="sed -i 's/\"serial\": 4/\"serial\": 5/' /var/lib/fleet-channel/release.json")
        refused("signature_invalid")

    with subtest("the agent's status says where the host is"):
        out = host.succeed("fleet-agent status")
        assert good in out, out
        host.succeed(f"test {first} != {good}")

    with subtest("an agent restarted during a switch that reloads systemd commits the release"):
        publish(6, slow)
        host.wait_until_succeeds("systemctl is-active fleet-vm-test-slow.service | grep -q activating", timeout=120)
        host.succeed("systemctl restart fleet-agent.service")
        host.wait_until_succeeds(f"grep -q '\"last_good\": \"{slow}\"' /var/lib/fleet-agent/state.json", timeout=240)
        assert state()["bad"]["serial"] != 6, state()
        assert resolve("/nix/var/nix/profiles/system") == slow
        host.succeed("journalctl -u fleet-agent.service | grep -q 'release 6 committed'")

    with subtest("a power cut during a trial boots the last committed system, which stays"):
        publish(7, good)
        host.wait_until_succeeds("grep -q '\"phase\": \"trial\"\\|\"phase\": \"health\"' /var/lib/fleet-agent/state.json", timeout=120)
        host.crash()
        host.start()
        host.wait_for_unit("fleet-agent.service")
        host.wait_until_succeeds("grep -q '\"serial\": 7,' /var/lib/fleet-agent/state.json && grep -q interrupted /var/lib/fleet-agent/state.json", timeout=180)
        assert resolve("/run/booted-system") == slow
        assert resolve("/nix/var/nix/profiles/system") == slow
        # Polls later, it has not been tried again.
        host.sleep(15)
        s = state()
        assert s["bad"]["serial"] == 7 and s["bad"]["code"] == "interrupted", s
        assert resolve("/run/current-system") == slow
  '';
}

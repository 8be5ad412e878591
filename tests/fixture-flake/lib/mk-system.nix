# The host factory: turns one inventory entry into something shaped like a NixOS system, with a
# toplevel built by /bin/sh (no nixpkgs is reachable in tests). The toplevel holds what the agent
# looks at: bin/switch-to-configuration, nixos-version, kernel, initrd. `salt` makes store paths
# unique to one test, so tests sharing the machine's store never share a system; `payloadMiB`
# adds that much incompressible data, for benchmarks that need a closure of realistic size.
# `tags` become services.fleet-agent.tags, as the NixOS module's option: fleet-sign's `tag:NAME`.
{ name, system, type ? "server", version ? "1", behaviour ? "ok", kernel ? "6.1.0", salt ? "", payloadMiB ? 0, tags ? [ ] }:
let
  toplevel = derivation {
    name = "nixos-system-${name}-${version}";
    inherit system;
    builder = "/bin/sh";
    args = [ "-c" ''
      set -e
      if [ "${behaviour}" = unbuildable ]; then
        echo "evaluating the configuration of ${name}"
        echo "error: the option services.broken.enable does not exist" >&2
        exit 1
      fi
      /bin/mkdir -p $out/bin
      /bin/cp ${./switch-to-configuration.sh} $out/bin/switch-to-configuration
      /bin/chmod 555 $out/bin/switch-to-configuration
      echo "${version}" > $out/nixos-version
      echo "${behaviour}" > $out/behaviour
      echo "${type}" > $out/host-type
      echo "${salt}" > $out/salt
      if [ ${toString payloadMiB} -gt 0 ]; then
        /bin/dd if=/dev/urandom of=$out/payload bs=1M count=${toString payloadMiB} 2>/dev/null
      fi
      echo "linux ${kernel}" > $out/kernel
      echo "initrd ${kernel}" > $out/initrd
    '' ];
  };
in
{
  config = {
    networking.hostName = name;
    nixpkgs.hostPlatform = system;
    system.build.toplevel = toplevel;
    services.fleet-agent.tags = tags;
  };
}

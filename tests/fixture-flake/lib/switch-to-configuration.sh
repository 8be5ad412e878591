#!/bin/sh
# Fixture stand-in for NixOS's switch-to-configuration.
#
# Everywhere: it appends "<action> <toplevel>" to $FLEET_FIXTURE_LOG, fails when the toplevel's
# behaviour says so or when the file $FLEET_FIXTURE_CONTROL/fail-<action> exists, cuts the host
# off its control plane on "cut-network" (creates $FLEET_FIXTURE_CONTROL/network-cut, which the
# test servers obey), and points the links named by $FLEET_FIXTURE_CURRENT (test, switch) and
# $FLEET_FIXTURE_BOOT (boot, switch) at its toplevel, as NixOS's activation and bootloader do;
# `boot` also writes $FLEET_FIXTURE_BOOT_DIR/extlinux/extlinux.conf as NixOS's extlinux builder
# does, except for "boot-noop", which succeeds without touching the boot default (NixOS without
# a boot loader).
#
# With FLEET_FIXTURE_NIXOS=1 (the booted machines) it also does to systemd what NixOS's
# switch-to-configuration does, in its order: the activation script (the links above, and
# "new-agent" changes fleet-agent.service by a drop-in at $FLEET_FIXTURE_AGENT_DROPIN, which
# activating any other system takes away), then `systemctl reset-failed` and `systemctl
# daemon-reload` on every switch, then it starts units ("slow" takes 10 s, "hang" never ends,
# "fail-unit" starts a service that fails a second later, after the switch), never restarting
# a changed unit marked X-RestartIfChanged=false (fleet-agent.service), and exits 4 when a unit
# is failed at its end.
#
# NixOS's switch and activation script name every program by its store path, so they work
# under any PATH (a transient unit on NixOS gets only systemd's bin): this script sets its own.
# Where the variables are not set (a transient systemd unit does not inherit the agent's
# environment), /etc/fleet-fixture.env may set them.
PATH=/usr/bin:/bin
export PATH
if [ -z "$FLEET_FIXTURE_LOG" ] && [ -r /etc/fleet-fixture.env ]; then
    . /etc/fleet-fixture.env
fi
action="$1"
top="${0%/bin/switch-to-configuration}"
# In a chroot store the script runs from <root>/nix/store/…; links name the logical path.
logical="/nix/store/${top##*/nix/store/}"
read -r behaviour < "$top/behaviour"
if [ -n "$FLEET_FIXTURE_LOG" ]; then
    echo "$action $logical" >> "$FLEET_FIXTURE_LOG"
fi
if [ -n "$FLEET_FIXTURE_CONTROL" ] && [ -e "$FLEET_FIXTURE_CONTROL/fail-$action" ]; then
    echo "switch-to-configuration: told to fail $action" >&2
    exit 1
fi
nixos="${FLEET_FIXTURE_NIXOS:-}"
case "$behaviour:$action" in
    fail:test | fail:switch)
        echo "switch-to-configuration: this system fails to activate" >&2
        exit 1
        ;;
esac
case "$action" in
    test | switch)
        echo "activating the configuration..." >&2
        # Activating a system that cuts the network cuts it; activating any other restores it.
        if [ -n "$FLEET_FIXTURE_CONTROL" ]; then
            if [ "$behaviour" = cut-network ]; then
                : > "$FLEET_FIXTURE_CONTROL/network-cut"
            else
                rm -f "$FLEET_FIXTURE_CONTROL/network-cut"
            fi
        fi
        [ -n "$FLEET_FIXTURE_CURRENT" ] && ln -sfn "$logical" "$FLEET_FIXTURE_CURRENT"
        changed=
        if [ -n "$FLEET_FIXTURE_AGENT_DROPIN" ]; then
            if [ "$behaviour" = new-agent ]; then
                # New settings, as the NixOS module delivers them: a config file of the new
                # system's own, named on the agent's command line.
                mkdir -p "${FLEET_FIXTURE_AGENT_DROPIN%/*}"
                config="/etc/fleet-agent/config-${logical##*/}.toml"
                cp /etc/fleet-agent/config.toml "$config"
                printf '[Service]\nEnvironment=FLEET_FIXTURE_SYSTEM=%s\nExecStart=\nExecStart=/usr/local/bin/fleet-agent --config %s run\n' \
                    "$logical" "$config" > "$FLEET_FIXTURE_AGENT_DROPIN"
                changed=1
            elif [ -e "$FLEET_FIXTURE_AGENT_DROPIN" ]; then
                rm -f "$FLEET_FIXTURE_AGENT_DROPIN"
                changed=1
            fi
        fi
        if [ -n "$nixos" ]; then
            systemctl reset-failed
            systemctl daemon-reload
            # fleet-agent.service has X-RestartIfChanged=false: NixOS leaves it running.
            if [ -n "$changed" ]; then
                echo "NOT restarting the following changed units: fleet-agent.service" >&2
            fi
        fi
        case "$behaviour" in
            slow) sleep 10 ;;
            hang) while :; do sleep 1; done ;;
            fail-unit)
                systemd-run --quiet --unit=fleet-fixture-broken --service-type=simple \
                    /bin/sh -c '/bin/sleep 1; exit 1' || :
                ;;
        esac
        if [ -n "$nixos" ]; then
            failed=$(systemctl list-units --state=failed --plain --no-legend | cut -d' ' -f1)
            if [ -n "$failed" ]; then
                echo "warning: the following units failed: $failed" >&2
                exit 4
            fi
        fi
        ;;
esac
case "$behaviour:$action" in
    boot-noop:boot | boot-noop:switch)
        # What NixOS does without a boot loader: it says so, and succeeds.
        echo "warning: do not know how to make this configuration bootable; please enable a boot loader." >&2
        ;;
    *:boot | *:switch)
        [ -n "$FLEET_FIXTURE_BOOT" ] && ln -sfn "$logical" "$FLEET_FIXTURE_BOOT"
        # The boot loader's config, as NixOS's extlinux builder writes it.
        if [ -n "$FLEET_FIXTURE_BOOT_DIR" ]; then
            mkdir -p "$FLEET_FIXTURE_BOOT_DIR/extlinux"
            printf '# Generated file, all changes will be lost on nixos-rebuild!\nTIMEOUT 50\nDEFAULT nixos-default\n\nLABEL nixos-default\n  MENU LABEL NixOS - Default\n  LINUX ../nixos/kernel\n  APPEND init=%s/init loglevel=4\n' \
                "$logical" > "$FLEET_FIXTURE_BOOT_DIR/extlinux/extlinux.conf.tmp"
            mv "$FLEET_FIXTURE_BOOT_DIR/extlinux/extlinux.conf.tmp" "$FLEET_FIXTURE_BOOT_DIR/extlinux/extlinux.conf"
        fi
        ;;
esac
exit 0

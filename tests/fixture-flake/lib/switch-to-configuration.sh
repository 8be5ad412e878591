#!/bin/sh
# Fixture stand-in for NixOS's switch-to-configuration. It appends "<action> <toplevel>" to
# $FLEET_FIXTURE_LOG, fails when the toplevel's behaviour says so or when the file
# $FLEET_FIXTURE_CONTROL/fail-<action> exists, hangs on "hang", cuts the host off its control
# plane on "cut-network" (creates $FLEET_FIXTURE_CONTROL/network-cut, which the test servers
# obey), and points the links named by $FLEET_FIXTURE_CURRENT (test, switch) and
# $FLEET_FIXTURE_BOOT (boot, switch) at its toplevel, as NixOS's activation and bootloader do.
# "slow" takes 10 s to activate; "fail-unit" leaves a failed systemd unit behind (booted
# containers); "new-agent" changes fleet-agent.service (a drop-in at
# $FLEET_FIXTURE_AGENT_DROPIN, then a daemon-reload, never a restart of that unit, as NixOS does
# for a unit with restartIfChanged = false), and activating any other system takes it away. Where the variables are not set (a transient systemd unit does not inherit the
# agent's environment), /etc/fleet-fixture.env may set them.
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
case "$behaviour:$action" in
    fail:test | fail:switch)
        echo "switch-to-configuration: this system fails to activate" >&2
        exit 1
        ;;
    hang:test | hang:switch)
        while :; do sleep 1; done
        ;;
    slow:test | slow:switch)
        sleep 10
        ;;
    fail-unit:test | fail-unit:switch)
        systemd-run --quiet --unit=fleet-fixture-broken --service-type=oneshot /bin/false || :
        ;;
esac
case "$action" in
    test | switch)
        # Activating a system that cuts the network cuts it; activating any other restores it.
        if [ -n "$FLEET_FIXTURE_CONTROL" ]; then
            if [ "$behaviour" = cut-network ]; then
                : > "$FLEET_FIXTURE_CONTROL/network-cut"
            else
                rm -f "$FLEET_FIXTURE_CONTROL/network-cut"
            fi
        fi
        ;;
esac
case "$action" in
    test | switch)
        [ -n "$FLEET_FIXTURE_CURRENT" ] && ln -sfn "$logical" "$FLEET_FIXTURE_CURRENT"
        if [ -n "$FLEET_FIXTURE_AGENT_DROPIN" ]; then
            if [ "$behaviour" = new-agent ]; then
                mkdir -p "${FLEET_FIXTURE_AGENT_DROPIN%/*}"
                printf '[Service]\nEnvironment=FLEET_FIXTURE_SYSTEM=%s\n' "$logical" > "$FLEET_FIXTURE_AGENT_DROPIN"
                systemctl daemon-reload
            elif [ -e "$FLEET_FIXTURE_AGENT_DROPIN" ]; then
                rm -f "$FLEET_FIXTURE_AGENT_DROPIN"
                systemctl daemon-reload
            fi
        fi
        ;;
esac
case "$action" in
    boot | switch)
        [ -n "$FLEET_FIXTURE_BOOT" ] && ln -sfn "$logical" "$FLEET_FIXTURE_BOOT"
        ;;
esac
exit 0

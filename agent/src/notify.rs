//! systemd's notification protocol (`Type=notify`): readiness, a status line for `systemctl
//! status`, and the watchdog. Each call does nothing when systemd did not ask for it
//! (`NOTIFY_SOCKET` or `WATCHDOG_USEC` unset), so the agent runs the same outside systemd.

use sd_notify::NotifyState;
use std::time::Duration;

/// Tells systemd the agent has loaded its state and is running, with what it is doing.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// The line `systemctl status fleet-agent` shows.
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// Tells systemd the agent is stopping.
pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(false, states) {
        log::debug!("sd_notify: {e}");
    }
}

/// How often to feed the watchdog, when the unit has `WatchdogSec=`: half its period.
pub fn watchdog_interval() -> Option<Duration> {
    let mut usec = 0;
    sd_notify::watchdog_enabled(false, &mut usec).then(|| Duration::from_micros(usec / 2))
}

/// Feeds the watchdog every `interval`, forever. It runs as a task on the agent's one runtime
/// thread, so it stops exactly when that thread is stuck: a blocking call that never returns,
/// a deadlock or a busy loop, and systemd then kills and restarts the agent, which resumes its
/// cycle from the state file. An await that never returns is not its business: every wait,
/// fetch and subprocess has a timeout of its own.
pub async fn feed_watchdog(interval: Duration) {
    loop {
        send(&[NotifyState::Watchdog]);
        tokio::time::sleep(interval).await;
    }
}

//! Reports to the collector (SPEC §8): signed with the host's key, queued on disk, sent by an
//! outbound HTTP POST and retried with backoff while the collector cannot be reached.
//!
//! The agent makes a report at every phase change, at the end of a cycle whose outcome differs
//! from the last one, at start, and as a heartbeat when it has said nothing for a while. Each
//! report carries the host's whole state, so the newest one always tells the truth; the queue
//! ([`queue`]) keeps them across restarts and power cuts until the collector took them, oldest
//! first. A heartbeat (nothing new, the state repeated) is sent from memory and never written:
//! an idle host writes nothing to its disk for it; the newest heartbeat waits in memory while
//! the collector cannot be reached, and a queued report replaces it. A report the collector refuses for good (malformed, too large, a replay) is dropped
//! with a log line; one it refuses for now (unknown host, forged: the release may not list this
//! host's current key yet; rate limits; errors) stays queued.

pub mod queue;
pub mod wire;

pub use wire::{Event, Report, ReportError, ReportRejection};

use crate::release::SecretKey;
use queue::Queue;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Where and how reports go: `[report]` in the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportSettings {
    /// The collector's base URL; reports go to `<url>/v1/report`.
    pub url: String,
    pub heartbeat: Duration,
    pub timeout: Duration,
    pub queue_limit: usize,
    /// Certificates to trust besides the system's (`ca_file`).
    pub ca_file: Option<std::path::PathBuf>,
}

/// Sends a host's reports. Shared by the deploy cycle (which pushes) and the sender task.
pub struct Reporter {
    key: SecretKey,
    queue: Queue,
    endpoint: String,
    client: reqwest::Client,
    heartbeat: Duration,
    /// The last report pushed, and when: the heartbeat repeats it.
    latest: Mutex<Option<(Report, Instant)>>,
    /// A signed heartbeat not delivered yet, in memory only.
    heartbeat_pending: Mutex<Option<queue::Queued>>,
    wake: Notify,
}

/// Why a delivery stopped.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("cannot reach the collector at {url}: {detail}")]
    Unreachable { url: String, detail: String },
    #[error("the collector answered {status} to report {counter}: {body}")]
    Refused {
        status: u16,
        counter: u64,
        body: String,
    },
    #[error("report queue: {0}")]
    Queue(#[from] std::io::Error),
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Reporter {
    pub fn new(
        settings: &ReportSettings,
        key: SecretKey,
        state_dir: &std::path::Path,
    ) -> Result<Self, String> {
        let tls = crate::tls::client_config(settings.ca_file.as_deref())?;
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .connect_timeout(crate::channel::CONNECT_TIMEOUT.min(settings.timeout))
            .timeout(settings.timeout)
            .user_agent(concat!("fleet-agent/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot set up the HTTP client for reports: {e}"))?;
        Ok(Self {
            key,
            queue: Queue::new(state_dir, settings.queue_limit),
            endpoint: format!(
                "{}{}",
                settings.url.trim_end_matches('/'),
                wire::REPORT_PATH
            ),
            client,
            heartbeat: settings.heartbeat,
            latest: Mutex::new(None),
            heartbeat_pending: Mutex::new(None),
            wake: Notify::new(),
        })
    }

    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    /// Gives the report its counter and time, signs it, queues it and wakes the sender: on disk,
    /// or in memory for a heartbeat (replacing an older one). A report that cannot be queued is
    /// logged and lost; the next one carries the same state.
    pub fn push(&self, mut report: Report) {
        let queued = self.queue.next_counter().and_then(|counter| {
            report.counter = counter;
            report.time = unix_now();
            let (body, signature) = report.sign(&self.key);
            let mut pending = self.heartbeat_pending.lock().expect("not poisoned");
            if report.event == Event::Heartbeat {
                *pending = Some(queue::Queued {
                    counter,
                    signature,
                    body,
                });
                return Ok(());
            }
            // This report says all a waiting heartbeat would, and more.
            *pending = None;
            self.queue.push(counter, &signature, &body)
        });
        match queued {
            Ok(()) => {
                log::debug!(
                    "queued report {} ({:?}, phase {})",
                    report.counter,
                    report.event,
                    report.phase
                );
                *self.latest.lock().expect("not poisoned") = Some((report, Instant::now()));
                self.wake.notify_one();
            }
            Err(e) => log::error!(
                "cannot queue a report in {}: {e}",
                self.queue.dir().display()
            ),
        }
    }

    /// Sends queued reports oldest first until the queue is empty or one cannot be delivered.
    /// Returns how many the collector took.
    pub async fn deliver(&self) -> Result<usize, DeliveryError> {
        let mut delivered = 0;
        loop {
            let (queued, from_disk) = match self.queue.oldest()? {
                Some(queued) => (queued, true),
                None => match self.heartbeat_pending.lock().expect("not poisoned").clone() {
                    Some(heartbeat) => (heartbeat, false),
                    None => break,
                },
            };
            let done = |counter: u64| -> Result<(), DeliveryError> {
                if from_disk {
                    self.queue.remove(counter)?;
                } else {
                    let mut pending = self.heartbeat_pending.lock().expect("not poisoned");
                    if pending.as_ref().is_some_and(|p| p.counter == counter) {
                        *pending = None;
                    }
                }
                Ok(())
            };
            let sent = self
                .client
                .post(&self.endpoint)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .header(wire::SIGNATURE_HEADER, &queued.signature)
                .body(queued.body)
                .send()
                .await;
            let response = sent.map_err(|e| DeliveryError::Unreachable {
                url: self.endpoint.clone(),
                detail: crate::process::error_chain(&e),
            })?;
            let status = response.status().as_u16();
            if response.status().is_success() {
                done(queued.counter)?;
                delivered += 1;
                continue;
            }
            let body = error_body(response).await;
            // Refused for good: sending it again cannot help, and it must not block the rest.
            if matches!(status, 400 | 409 | 413) {
                log::warn!(
                    "the collector refused report {} for good ({status}): {body}; dropping it",
                    queued.counter
                );
                done(queued.counter)?;
                continue;
            }
            return Err(DeliveryError::Refused {
                status,
                counter: queued.counter,
                body,
            });
        }
        Ok(delivered)
    }

    /// When the heartbeat is due: the heartbeat interval after the last report pushed (none is
    /// due before the first).
    fn next_heartbeat(&self) -> Instant {
        let latest = self.latest.lock().expect("not poisoned");
        latest
            .as_ref()
            .map_or(Instant::now() + self.heartbeat, |(_, at)| {
                *at + self.heartbeat
            })
    }

    /// Whether anything waits for delivery, on disk or in memory.
    fn pending(&self) -> bool {
        self.heartbeat_pending
            .lock()
            .expect("not poisoned")
            .is_some()
            || !self.queue.counters().unwrap_or_default().is_empty()
    }

    /// The sender: delivers what is queued, backing off while the collector cannot be reached,
    /// and repeats the latest report as a heartbeat when nothing was pushed for a while.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        let mut failures = 0u32;
        let mut retry_at = Instant::now();
        loop {
            let now = Instant::now();
            if now >= self.next_heartbeat() {
                let latest = self.latest.lock().expect("not poisoned").clone();
                if let Some((mut report, _)) = latest {
                    report.event = Event::Heartbeat;
                    self.push(report);
                }
            }
            let pending = self.pending();
            if pending && now >= retry_at {
                match self.deliver().await {
                    Ok(n) => {
                        if failures > 0 {
                            log::info!("the collector is back: delivered {n} queued reports");
                        }
                        failures = 0;
                    }
                    Err(e) => {
                        failures += 1;
                        let backoff = backoff(failures, self.heartbeat);
                        retry_at = Instant::now() + backoff;
                        let queued = self.queue.counters().map(|c| c.len()).unwrap_or(0);
                        let message = format!(
                            "{e}; {queued} reports queued, retrying in {}",
                            humantime::format_duration(backoff)
                        );
                        if failures == 1 {
                            log::warn!(code = "collector_unreachable"; "{message}");
                        } else {
                            log::debug!("{message}");
                        }
                    }
                }
            }
            let pending = self.pending();
            let wake_at = if pending && failures > 0 {
                self.next_heartbeat().min(retry_at)
            } else {
                self.next_heartbeat()
            };
            tokio::select! {
                () = tokio::time::sleep_until(wake_at.into()) => {}
                () = self.wake.notified() => {}
                () = cancel.cancelled() => return,
            }
        }
    }
}

/// Waits between delivery attempts: 2 s doubling per failure, up to the heartbeat (at most
/// 5 min), with jitter so a fleet does not retry in lockstep when the collector returns.
fn backoff(failures: u32, heartbeat: Duration) -> Duration {
    let cap = heartbeat
        .min(Duration::from_secs(300))
        .max(Duration::from_secs(1));
    let base = Duration::from_secs(2)
        .saturating_mul(2u32.saturating_pow(failures.saturating_sub(1).min(16)))
        .min(cap);
    base + Duration::from_millis(fastrand::u64(0..=base.as_millis() as u64 / 4))
}

/// The start of a refusal's body, for the log: read as it streams and cut at 4 KiB, so a
/// collector that answers with an endless body costs nothing more.
async fn error_body(mut response: reqwest::Response) -> String {
    let mut body = Vec::new();
    while body.len() < 4096 {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            _ => break,
        }
    }
    String::from_utf8_lossy(&body).chars().take(300).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let hb = Duration::from_secs(600);
        let b1 = backoff(1, hb);
        assert!(b1 >= Duration::from_secs(2) && b1 <= Duration::from_millis(2500));
        let b3 = backoff(3, hb);
        assert!(b3 >= Duration::from_secs(8) && b3 <= Duration::from_secs(10));
        let b20 = backoff(20, hb);
        assert!(b20 >= Duration::from_secs(300) && b20 <= Duration::from_secs(375));
        assert!(backoff(20, Duration::from_secs(30)) <= Duration::from_millis(37_500));
    }
}

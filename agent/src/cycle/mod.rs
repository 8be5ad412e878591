//! The deploy cycle: poll → verify → realise → trial → health → commit, or rollback.
//!
//! [`Agent`] owns the persisted [`State`] and moves it through the [`Phase`]s, saving it
//! atomically before every step that changes the system, so a kill at any point resumes
//! ([`Agent::resume`]) into a committed candidate or the last good system, never in between.
//! Nothing is realised or switched before [`crate::release::verify`] accepted the release: the
//! apply steps take a [`VerifiedRelease`], which only the verifier creates.

mod apply;
#[cfg(test)]
mod tests;

use crate::activate::Activator;
use crate::channel::{Channel, ChannelError, Fetched, FetchedFreshness, FreshnessPolled, Polled};
use crate::config::Config;
use crate::health::CheckResult;
use crate::identity;
use crate::metrics::{self, Durations};
use crate::nix::{resolve_link, Nix};
use crate::release::StorePath;
use crate::release::{self, Accepted, Digest, Fresh, VerifiedRelease, VerifyContext, VerifyError};
use crate::report::wire::{clip, MAX_CHECKS, MAX_DETAIL, MAX_MESSAGE, REPORT_FORMAT};
use crate::report::{Event, Report, ReportError, Reporter};
use crate::state::{AcceptedRelease, LastError, Phase, State, StateError, StateFile};
use serde::Serialize;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// How one cycle ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum Outcome {
    /// The channel holds no release yet.
    NoRelease,
    /// The host already runs what the release names (or the release did not change).
    UpToDate { serial: Option<u64> },
    /// The release was refused; nothing was fetched or changed.
    Refused { code: String, message: String },
    /// The release failed here before and is not retried until a higher serial.
    KnownBad { serial: u64 },
    /// The release asks this host to wait until `not_before`.
    Waiting { serial: u64, not_before: u64 },
    /// The candidate is committed: profile and boot default point at it.
    Committed {
        serial: u64,
        toplevel: String,
        reboot_needed: bool,
    },
    /// The candidate failed and the host is back on its last good system.
    RolledBack {
        serial: u64,
        code: String,
        message: String,
    },
    /// Something failed before the system was touched; retried at the next poll.
    Failed { code: String, message: String },
    /// Going back to the last good system failed: the host needs a person.
    RollbackFailed { message: String },
    /// The machine reboots into the candidate (or back to the last good system); the agent
    /// checks it after the boot.
    Rebooting { serial: u64 },
    /// The agent was told to stop during a trial: the state says where, and the next start
    /// resumes it (waits for the switch, runs the health window again, or rolls back).
    Stopped { serial: u64, message: String },
}

impl Outcome {
    /// The outcome's name, as in its JSON form.
    pub fn name(&self) -> &'static str {
        match self {
            Self::NoRelease => "no-release",
            Self::UpToDate { .. } => "up-to-date",
            Self::Refused { .. } => "refused",
            Self::KnownBad { .. } => "known-bad",
            Self::Waiting { .. } => "waiting",
            Self::Committed { .. } => "committed",
            Self::RolledBack { .. } => "rolled-back",
            Self::Failed { .. } => "failed",
            Self::RollbackFailed { .. } => "rollback-failed",
            Self::Stopped { .. } => "stopped",
            Self::Rebooting { .. } => "rebooting",
        }
    }

    /// What makes two outcomes the same news: name, release and reason code.
    fn news(&self) -> String {
        match self {
            Self::UpToDate { serial } => format!("up-to-date {serial:?}"),
            Self::KnownBad { serial } | Self::Waiting { serial, .. } => {
                format!("{} {serial}", self.name())
            }
            Self::Committed { serial, .. } => format!("committed {serial}"),
            Self::RolledBack { serial, code, .. } => format!("rolled-back {serial} {code}"),
            Self::Refused { code, .. } | Self::Failed { code, .. } => {
                format!("{} {code}", self.name())
            }
            Self::Stopped { serial, .. } => format!("stopped {serial}"),
            Self::Rebooting { serial } => format!("rebooting {serial}"),
            Self::NoRelease | Self::RollbackFailed { .. } => self.name().to_owned(),
        }
    }

    /// The exit code of `fleet-agent once` (docs/fleet-agent.md).
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::NoRelease
            | Self::UpToDate { .. }
            | Self::Committed { .. }
            | Self::KnownBad { .. }
            | Self::Waiting { .. }
            | Self::Rebooting { .. } => 0,
            Self::Failed { .. } | Self::Stopped { .. } => 1,
            Self::Refused { .. } => 3,
            Self::RolledBack { .. } => 4,
            Self::RollbackFailed { .. } => 5,
        }
    }

    /// Whether the next poll should come sooner (something changed) or back off (an error).
    pub fn is_change(&self) -> bool {
        matches!(self, Self::Committed { .. } | Self::RolledBack { .. })
    }

    pub fn is_error(&self) -> bool {
        matches!(self, Self::Failed { .. } | Self::RollbackFailed { .. })
    }
}

/// The time now, never below the persisted floor (a board without a clock boots in 1970).
fn now(floor: u64) -> u64 {
    let clock = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    clock.max(floor)
}

fn unix_now() -> u64 {
    now(0)
}

/// The agent for one host.
pub struct Agent {
    pub(crate) config: Config,
    pub(crate) state_file: StateFile,
    pub(crate) state: State,
    pub(crate) channel: Channel,
    pub(crate) nix: Nix,
    pub(crate) activator: Activator,
    pub(crate) cancel: CancellationToken,
    /// The verdict on the last release the channel sent. When the channel reports no change it
    /// is judged again without re-checking signatures over the same bytes: a pending release
    /// may now be due or retried, an accepted one may have expired. Shared, not copied, by
    /// each poll.
    last_verdict: Option<Result<Arc<VerifiedRelease>, VerifyError>>,
    /// The verdict on the freshness statement for that release (hosts that trust freshness
    /// keys): kept while it is young, fetched again once it lived half its life.
    last_fresh: Option<Result<Fresh, VerifyError>>,
    /// Signs and queues reports for the collector, when one is configured.
    reporter: Option<Arc<Reporter>>,
    /// How long the steps of the last deploy took.
    pub(crate) durations: Durations,
    /// The last cycle's outcome name, and what made it news (see [`Outcome::news`]).
    last_outcome: Option<(&'static str, String)>,
    /// A release known to need a reboot (serial, toplevel), realised and waiting for the
    /// reboot window: not realised again at every poll.
    pub(crate) awaiting_window: Option<(u64, String)>,
    /// The boot in which a boot drift was last reported and repaired.
    drift_boot: Option<String>,
}

/// Why the agent cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("release channel: {0}")]
    Channel(#[from] ChannelError),
}

impl Agent {
    /// Loads the state; a host without one starts from the system it runs now.
    pub fn open(config: Config, cancel: CancellationToken) -> Result<Self, StartError> {
        let state_file = StateFile::new(&config.state_dir);
        let state = match state_file.load()? {
            Some(state) => state,
            None => {
                let running = resolve_link(&config.current_system);
                log::info!(
                    store_path = running.as_deref().unwrap_or("");
                    "no state yet: starting from the running system {}",
                    running.as_deref().unwrap_or("(unknown)")
                );
                let state = State::fresh(running);
                state_file.save(&state)?;
                state
            }
        };
        let channel = Channel::new(&config)?;
        let reporter = config.report.as_ref().and_then(|settings| {
            let made = identity::load_or_create(&config.state_dir, &config.host)
                .map_err(|e| e.to_string())
                .and_then(|key| Reporter::new(settings, key, &config.state_dir));
            match made {
                Ok(reporter) => Some(Arc::new(reporter)),
                Err(e) => {
                    // Deploys go on without reports; the journal says why.
                    log::error!(code = "report_setup"; "no reports will be sent: {e}");
                    None
                }
            }
        });
        Ok(Self {
            nix: Nix::new(&config),
            activator: Activator::new(&config),
            channel,
            state_file,
            state,
            config,
            cancel,
            last_verdict: None,
            last_fresh: None,
            reporter,
            durations: Durations::default(),
            last_outcome: None,
            awaiting_window: None,
            drift_boot: None,
        })
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    /// The reporter, for the task that delivers reports.
    pub fn reporter(&self) -> Option<Arc<Reporter>> {
        self.reporter.clone()
    }

    /// The host's state as a report (without counter and time: the reporter sets those).
    pub fn snapshot(&self, event: Event) -> Report {
        let about = self.state.phase.about();
        let target = about.map(|(serial, _)| serial);
        let candidate = about.map(|(_, toplevel)| toplevel.to_owned());
        let store_path = |path: Option<String>| path.filter(|p| StorePath::parse(p).is_ok());
        Report {
            format: REPORT_FORMAT,
            fleet: self.config.fleet.clone(),
            host: self.config.host.clone(),
            counter: 0,
            time: unix_now(),
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            event,
            phase: self.state.phase.name().to_owned(),
            target,
            committed: self.state.committed_serial,
            accepted: self.state.accepted.as_ref().map(|a| a.serial),
            outcome: self
                .last_outcome
                .as_ref()
                .map(|(name, _)| (*name).to_owned()),
            error: self.state.last_error.as_ref().map(|e| ReportError {
                code: e.code.clone(),
                message: clip(&e.message, MAX_MESSAGE),
                at: e.at,
            }),
            current: store_path(resolve_link(&self.config.current_system)),
            candidate: store_path(candidate),
            last_good: store_path(self.state.last_good.clone()),
            health: self
                .state
                .last_health
                .iter()
                .take(MAX_CHECKS)
                .map(|c| CheckResult {
                    name: clip(&c.name, MAX_DETAIL),
                    detail: clip(&c.detail, MAX_DETAIL),
                    ..c.clone()
                })
                .collect(),
            reboot_needed: self.state.reboot_needed,
            last_success: self.state.last_success,
        }
    }

    /// Tells the world the host's state: queues a report and rewrites the metrics file.
    pub fn publish(&self, event: Event) {
        if self.reporter.is_none() && self.config.metrics_dir.is_none() {
            return;
        }
        let report = self.snapshot(event);
        let queued = self.reporter.as_ref().map(|reporter| {
            reporter.push(report.clone());
            reporter.queue().counters().map_or(0, |c| c.len())
        });
        if let Some(dir) = &self.config.metrics_dir {
            let text = metrics::render(&report, &self.durations, queued);
            if let Err(e) = metrics::write(dir, &text) {
                log::warn!("cannot write metrics to {}: {e}", dir.display());
            }
        }
    }

    /// Moves to `phase` and saves; logs one line per transition.
    pub(crate) fn transition(&mut self, phase: Phase) -> Result<(), StateError> {
        let about = phase.about();
        let (serial, store_path) = (
            about.map(|(serial, _)| serial),
            about.map(|(_, toplevel)| toplevel.to_owned()),
        );
        log::info!(
            phase = phase.name(),
            serial = serial.map(|s| s.to_string()).unwrap_or_default().as_str(),
            store_path = store_path.as_deref().unwrap_or("");
            "phase {} -> {}{}",
            self.state.phase.name(),
            phase.name(),
            serial.map(|s| format!(" (release {s})")).unwrap_or_default()
        );
        self.state.phase = phase;
        let saved = self.save();
        self.publish(Event::Phase);
        crate::notify::status(&self.status_line());
        saved
    }

    /// Each cycle's outcome replaces or clears the standing error, so it names a cause that
    /// stands now: a failure records its own; a release known to be bad for this host keeps its
    /// reason standing; an outcome with nothing wrong clears it (a boot drift stands until a
    /// boot runs the committed system).
    fn settle_error(&mut self, outcome: &Outcome) {
        let standing = match outcome {
            Outcome::KnownBad { .. } => self.state.bad.as_ref().map(|bad| LastError {
                code: bad.code.clone(),
                message: bad.reason.clone(),
                at: match &self.state.last_error {
                    Some(e) if e.code == bad.code && e.serial == Some(bad.serial) => e.at,
                    _ => unix_now(),
                },
                serial: Some(bad.serial),
            }),
            Outcome::NoRelease
            | Outcome::UpToDate { .. }
            | Outcome::Waiting { .. }
            | Outcome::Committed { .. }
            | Outcome::Rebooting { .. } => match &self.state.last_error {
                Some(e) if e.code == "boot_drift" && self.boot_drift().is_some() => return,
                _ => None,
            },
            Outcome::Refused { .. }
            | Outcome::Failed { .. }
            | Outcome::RolledBack { .. }
            | Outcome::RollbackFailed { .. }
            | Outcome::Stopped { .. } => return,
        };
        if self.state.last_error != standing {
            self.state.last_error = standing;
            if let Err(e) = self.save() {
                log::error!("{e}");
            }
        }
    }

    /// Why this boot runs something other than the committed system, when the machine booted
    /// since the commit: the bootloader did not boot the boot default the commit set.
    fn boot_drift(&self) -> Option<String> {
        let committed_boot = self.state.committed_boot.as_deref()?;
        if crate::state::boot_id()? == committed_boot {
            return None;
        }
        let booted = crate::nix::resolve_link(&self.config.booted_system)?;
        let last_good = self.state.last_good.as_deref()?;
        (booted != last_good).then(|| {
            format!(
                "this boot runs {booted}, not the committed system {last_good}: the bootloader \
                 did not boot the boot default set at the commit"
            )
        })
    }

    /// Reports a boot that did not run the committed system (`boot_drift`, a standing error
    /// until a boot does) and, once per boot, makes the committed system the boot default
    /// again, so the next boot runs it.
    async fn repair_boot_drift(&mut self, serial: u64, toplevel: &str, reason: String) -> Outcome {
        let boot = crate::state::boot_id();
        let repaired_this_boot = self
            .state
            .last_error
            .as_ref()
            .is_some_and(|e| e.code == "boot_drift" && self.drift_boot == boot);
        if repaired_this_boot {
            return Outcome::UpToDate {
                serial: Some(serial),
            };
        }
        log::error!(code = "boot_drift", serial = serial.to_string().as_str(), store_path = toplevel; "{reason}");
        self.drift_boot = boot;
        let message = match self.make_boot_default(serial, toplevel).await {
            Ok(()) => format!("{reason}; made it the boot default again"),
            Err((_, why)) => format!("{reason}; making it the boot default again failed: {why}"),
        };
        self.record_error("boot_drift", &message, None);
        Outcome::Failed {
            code: "boot_drift".into(),
            message,
        }
    }

    /// What the agent is doing, for `systemctl status`: the phase and the release it is about,
    /// or when idle the committed and newest verified releases and a standing error.
    pub fn status_line(&self) -> String {
        let serial = |s: Option<u64>| s.map_or("none".to_owned(), |s| s.to_string());
        match self.state.phase.about() {
            Some((target, _)) => format!(
                "{} release {target} (committed: release {})",
                self.state.phase.name(),
                serial(self.state.committed_serial)
            ),
            None => {
                let mut line = format!(
                    "idle: committed release {}, newest verified {}",
                    serial(self.state.committed_serial),
                    serial(self.state.accepted.as_ref().map(|a| a.serial))
                );
                if let Some(error) = &self.state.last_error {
                    line += &format!(", last error {}", error.code);
                }
                line
            }
        }
    }

    pub(crate) fn save(&mut self) -> Result<(), StateError> {
        self.state_file.save(&self.state)
    }

    /// Records the last error and saves the state (a failed save is logged: the error is
    /// already being reported).
    pub(crate) fn record_error(&mut self, code: &str, message: &str, serial: Option<u64>) {
        self.state.last_error = Some(LastError {
            code: code.to_owned(),
            message: message.to_owned(),
            at: unix_now(),
            serial,
        });
        if let Err(e) = self.save() {
            log::error!("{e}");
        }
    }

    /// Records a failure that happened before the system was touched.
    fn fail(&mut self, code: &str, message: String, serial: Option<u64>) -> Outcome {
        log::error!(code = code; "{message}");
        self.record_error(code, &message, serial);
        Outcome::Failed {
            code: code.to_owned(),
            message,
        }
    }

    /// One full cycle: poll, verify, and apply a new release if there is one. Reports the
    /// outcome when it is news.
    pub async fn cycle(&mut self) -> Outcome {
        let outcome = self.cycle_inner().await;
        self.settle_error(&outcome);
        let news = outcome.news();
        let is_news = self
            .last_outcome
            .as_ref()
            .is_none_or(|(_, last)| *last != news);
        self.last_outcome = Some((outcome.name(), news));
        if is_news {
            self.publish(Event::Outcome);
        }
        outcome
    }

    async fn cycle_inner(&mut self) -> Outcome {
        if let Some(outcome) = self.resume().await {
            if matches!(
                outcome,
                Outcome::RollbackFailed { .. } | Outcome::Rebooting { .. }
            ) {
                return outcome;
            }
        }
        let (verdict, statement) = match self.channel.poll().await {
            Ok(Polled::Empty) => return Outcome::NoRelease,
            // Validators live in memory only, so after a restart the first poll fetches in
            // full and a verdict exists whenever the channel says nothing changed.
            Ok(Polled::Unchanged) => match self.last_verdict.clone() {
                Some(verdict) => (verdict.and_then(|v| self.still_valid(v)), None),
                None => return Outcome::NoRelease,
            },
            Ok(Polled::Release(fetched)) => {
                let verdict = match self.verify(&fetched) {
                    Ok(verified) if verified.has_host_tree() => {
                        // Format 2: this host's entry, from its own piece, proven by the root.
                        let serial = verified.serial();
                        let host = self.config.host.clone();
                        match self.channel.fetch_host_piece(serial, &host).await {
                            Ok(piece) => verified.with_host_piece(&host, piece.as_deref()),
                            Err(e) => {
                                return self.fail(
                                    e.code(),
                                    format!(
                                        "cannot fetch this host's entry of release {serial} \
                                         from {}: {e}",
                                        self.config.channel
                                    ),
                                    Some(serial),
                                )
                            }
                        }
                    }
                    other => other,
                }
                .map(|v| Arc::new(v.only_host(&self.config.host)));
                self.last_verdict = Some(verdict.clone());
                (verdict, Some(fetched.freshness))
            }
            Err(e) => {
                return self.fail(
                    e.code(),
                    format!("cannot poll {}: {e}", self.config.channel),
                    None,
                )
            }
        };
        let verdict = match verdict {
            Ok(verified) => match self.freshness(&verified, statement).await {
                Ok(fresh) => Ok((verified, fresh)),
                Err(Ok(e)) => Err(e),
                Err(Err(outcome)) => return outcome,
            },
            Err(e) => Err(e),
        };
        match verdict {
            Ok((verified, fresh)) => {
                self.accept(&verified, fresh);
                self.decide(verified).await
            }
            Err(e) => {
                if matches!(
                    e.code(),
                    "signature_invalid" | "freshness_mismatch" | "freshness_untrusted"
                ) {
                    // Maybe caught between the writes of two files: fetch all next time.
                    self.channel.forget();
                }
                self.refuse(e.code(), e.to_string(), None)
            }
        }
    }

    /// A release verified at an earlier poll, judged again for the passing of time: its own
    /// expiry (when freshness statements do not replace it).
    fn still_valid(
        &self,
        verified: Arc<VerifiedRelease>,
    ) -> Result<Arc<VerifiedRelease>, VerifyError> {
        let now = now(self.state.time_floor);
        let release = verified.release();
        if self.config.freshness.is_none() && now >= release.expires {
            return Err(VerifyError::Expired {
                serial: release.serial,
                expires: release.expires,
                now,
            });
        }
        Ok(verified)
    }

    /// The freshness statement for a verified release, when the host trusts freshness keys
    /// (`Ok(None)` when it does not). `statement` is what the poll brought with a changed
    /// release; for an unchanged one the statement known is kept while young, and asked for
    /// again once it lived half its life. A refusal is `Err(Ok(reason))`; a channel that
    /// cannot be read while no valid statement is known, `Err(Err(outcome))`.
    async fn freshness(
        &mut self,
        verified: &VerifiedRelease,
        statement: Option<Option<FetchedFreshness>>,
    ) -> Result<Option<Fresh>, Result<VerifyError, Outcome>> {
        let Some(keys) = self.config.freshness.clone() else {
            return Ok(None);
        };
        let now = now(self.state.time_floor);
        let check = |statement: &Option<FetchedFreshness>| {
            release::verify_freshness(FetchedFreshness::as_pair(statement), &keys, verified, now)
        };
        let known = match &self.last_fresh {
            Some(Ok(fresh)) if now < fresh.expires => Some(*fresh),
            _ => None,
        };
        let verdict = match statement {
            Some(statement) => check(&statement),
            None => match known {
                Some(fresh) if !fresh.is_aging(now) => Ok(fresh),
                _ => match self.channel.poll_freshness().await {
                    Ok(FreshnessPolled::Statement(statement)) => check(&statement),
                    Ok(FreshnessPolled::Unchanged) => match self.last_fresh.clone() {
                        Some(Ok(fresh)) if now >= fresh.expires => {
                            Err(VerifyError::FreshnessExpired {
                                serial: verified.serial(),
                                expires: fresh.expires,
                                now,
                            })
                        }
                        Some(verdict) => verdict,
                        None => Err(VerifyError::FreshnessMissing {
                            serial: verified.serial(),
                        }),
                    },
                    // A statement still valid stands while the channel cannot be read.
                    Err(e) => match known {
                        Some(fresh) => Ok(fresh),
                        None => {
                            return Err(Err(self.fail(
                                e.code(),
                                format!(
                                    "cannot poll the freshness statement of {}: {e}",
                                    self.config.channel
                                ),
                                None,
                            )))
                        }
                    },
                },
            },
        };
        self.last_fresh = Some(verdict.clone());
        verdict.map(Some).map_err(Ok)
    }

    fn verify(&self, fetched: &Fetched) -> Result<VerifiedRelease, VerifyError> {
        let floor = self.state.accepted.as_ref().and_then(|a| {
            Some(Accepted {
                serial: a.serial,
                digest: Digest::from_hex(&a.digest)?,
            })
        });
        let context = VerifyContext {
            fleet: self.config.fleet.clone(),
            now: now(self.state.time_floor),
            floor,
            own_expiry: self.config.freshness.is_none(),
        };
        release::verify(
            &fetched.document,
            &fetched.signatures,
            &self.config.trust,
            &context,
        )
    }

    fn refuse(&mut self, code: &str, message: String, serial: Option<u64>) -> Outcome {
        log::warn!(code = code; "{message}");
        self.record_error(code, &message, serial);
        Outcome::Refused {
            code: code.to_owned(),
            message,
        }
    }

    /// Raises the serial floor and the time floor to a verified release (and its freshness
    /// statement).
    fn accept(&mut self, verified: &VerifiedRelease, fresh: Option<Fresh>) {
        let release = verified.release();
        let issued_at = release
            .issued_at
            .max(fresh.map_or(0, |fresh| fresh.issued_at));
        let newer = self
            .state
            .accepted
            .as_ref()
            .is_none_or(|a| a.serial < release.serial);
        let later = issued_at > self.state.time_floor;
        if newer {
            log::info!(serial = release.serial.to_string().as_str(); "accepted release {} signed by {}", release.serial, verified.signed_by().join(", "));
            self.state.accepted = Some(AcceptedRelease {
                serial: release.serial,
                digest: verified.digest().to_string(),
                issued_at: release.issued_at,
            });
        }
        if later {
            self.state.time_floor = issued_at;
        }
        if newer || later {
            if let Err(e) = self.save() {
                log::error!("{e}");
            }
        }
    }

    /// `Waiting` until the reboot window opens, when there is a window and it is closed now.
    pub(crate) fn outside_reboot_window(&self, serial: u64) -> Option<Outcome> {
        let window = self.config.reboot_window?;
        let now = now(self.state.time_floor);
        if window.contains(now) {
            return None;
        }
        Some(Outcome::Waiting {
            serial,
            not_before: window.next_open(now),
        })
    }

    /// Decides what a verified release means for this host, and applies it when needed.
    async fn decide(&mut self, verified: Arc<VerifiedRelease>) -> Outcome {
        let serial = verified.serial();
        let entry = match verified.host(&self.config.host) {
            Ok(entry) => entry.clone(),
            Err(e) => return self.refuse(e.code(), e.to_string(), Some(serial)),
        };
        let toplevel = entry.toplevel.as_str().to_owned();
        if self.state.last_good.as_deref() == Some(toplevel.as_str()) {
            if let Some(reason) = self.boot_drift() {
                return self.repair_boot_drift(serial, &toplevel, reason).await;
            }
            // Up to date: `settle_error` clears what stood.
            return Outcome::UpToDate {
                serial: Some(serial),
            };
        }
        if self.state.bad.as_ref().is_some_and(|b| b.serial >= serial) {
            return Outcome::KnownBad { serial };
        }
        if entry.held {
            // A paused rollout: stay on what runs; the next release says when to move.
            log::info!(serial = serial.to_string().as_str(); "release {serial} holds this host where it is (the rollout is paused)");
            return Outcome::Waiting {
                serial,
                not_before: verified.release().expires,
            };
        }
        let now = now(self.state.time_floor);
        if let Some(not_before) = entry.not_before.filter(|t| *t > now) {
            log::info!(serial = serial.to_string().as_str(); "release {serial} waits until {not_before} for this host");
            return Outcome::Waiting { serial, not_before };
        }
        if self.awaiting_window.as_ref() == Some(&(serial, toplevel.clone())) {
            if let Some(waiting) = self.outside_reboot_window(serial) {
                return waiting;
            }
        }
        let tried = self
            .state
            .attempts
            .as_ref()
            .filter(|a| a.serial == serial && a.toplevel == toplevel)
            .map_or(0, |a| a.count);
        if tried >= self.config.max_attempts {
            let message = format!(
                "release {serial} failed {tried} times on this host: giving up until a higher \
                 serial (a person should look at the last error)"
            );
            self.mark_bad(serial, &toplevel, "attempts_exhausted", &message);
            log::error!(code = "attempts_exhausted"; "{message}");
            return Outcome::Failed {
                code: "attempts_exhausted".into(),
                message,
            };
        }
        self.apply(&verified, &toplevel).await
    }
}

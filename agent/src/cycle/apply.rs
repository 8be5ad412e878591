//! The phases that change the host: realise, trial, health, commit, rollback; and resuming an
//! interrupted cycle after a restart.

use super::{unix_now, Agent, Outcome};
use crate::activate::{reboot_parts, Action};
use crate::bootloader::{self, BootDefault};
use crate::config::{RealiseMode, RebootPolicy};
use crate::failpoint;
use crate::health::{failed_units, Health};
use crate::nix::NixError;
use crate::release::VerifiedRelease;
use crate::state::{Attempts, BadRelease, Phase};
use std::time::Instant;

impl Agent {
    pub(crate) fn mark_bad(&mut self, serial: u64, toplevel: &str, code: &str, reason: &str) {
        self.state.bad = Some(BadRelease {
            serial,
            toplevel: toplevel.to_owned(),
            code: code.to_owned(),
            reason: reason.to_owned(),
        });
        self.state.attempts = None;
        self.record_error(code, reason, Some(serial));
    }

    fn gc_root(&self, name: &str) -> std::path::PathBuf {
        self.config.state_dir.join("gcroots").join(name)
    }

    /// Realise → trial → health → commit, or rollback.
    pub(crate) async fn apply(&mut self, verified: &VerifiedRelease, toplevel: &str) -> Outcome {
        let serial = verified.serial();
        // Before anything is fetched or counted as an attempt: an update that does not fit is
        // refused with the numbers, and asked again at every poll.
        if let Err(e) = self.check_disk_space(verified, toplevel).await {
            let message = format!("cannot realise release {serial}: {e}");
            return self.fail(e.code(), message, Some(serial));
        }
        self.count_attempt(serial, toplevel);
        // A deploy of a newer release supersedes the error of an older one (what stood was
        // about that release, or that the channel could not be read): reports during this
        // deploy must not say the host fails it. A retry of the same release keeps its error,
        // and a boot drift stands until a boot runs the committed system.
        if self
            .state
            .last_error
            .as_ref()
            .is_some_and(|e| e.code != "boot_drift" && e.serial.is_none_or(|s| s < serial))
        {
            self.state.last_error = None;
        }
        let phase = Phase::Realising {
            serial,
            toplevel: toplevel.to_owned(),
        };
        if let Err(e) = self.transition(phase) {
            return self.fail("state_write", e.to_string(), Some(serial));
        }
        self.durations.steps.clear();
        let started = Instant::now();
        let realised = self.realise(verified, toplevel).await;
        self.durations.record("realise", started);
        if let Err(e) = realised {
            let _ = self.transition(Phase::Idle);
            let message = format!("cannot realise release {serial}: {e}");
            if matches!(
                e,
                NixError::EvaluationMismatch { .. } | NixError::NotAToplevel { .. }
            ) {
                // The release itself is wrong for this host: retrying cannot help.
                log::error!(code = e.code(); "{message}");
                self.mark_bad(serial, toplevel, e.code(), &message);
                return Outcome::Failed {
                    code: e.code().into(),
                    message,
                };
            }
            return self.fail(e.code(), message, Some(serial));
        }
        failpoint::hit("after-realise");
        self.trial(serial, toplevel).await
    }

    /// The substituters to realise a release's closure from: the cache that is the channel,
    /// the configured ones and, unless turned off, the release's hints.
    fn substituters_for(&self, verified: &VerifiedRelease) -> Vec<String> {
        let mut substituters = Vec::new();
        if let crate::config::ChannelSpec::Cache(cache) = &self.config.channel {
            substituters.push(cache.store.clone());
        }
        substituters.extend(self.config.substituters.iter().cloned());
        if self.config.use_release_substituters {
            substituters.extend(verified.release().substituters.iter().cloned());
        }
        substituters
    }

    /// Refuses an update whose closure would leave less than `disk_reserve` free on the
    /// store's filesystem, from the caches' narinfos (what a dry run would fetch, unpacked);
    /// with `collect_garbage`, collects what nothing roots first. When the sizes or the free
    /// space cannot be read, the realise goes ahead (Nix then fails on a full disk as before).
    async fn check_disk_space(
        &self,
        verified: &VerifiedRelease,
        toplevel: &str,
    ) -> Result<(), NixError> {
        let substituters = self.substituters_for(verified);
        let plan = match self
            .nix
            .fetch_plan(toplevel, &substituters, &self.cancel)
            .await
        {
            Ok(plan) => plan,
            Err(e @ NixError::Process(crate::process::ProcessError::Cancelled { .. })) => {
                return Err(e)
            }
            Err(e) => {
                log::warn!("cannot tell how much the update needs on disk ({e}): going ahead");
                return Ok(());
            }
        };
        if plan.unpacked == 0 {
            return Ok(());
        }
        let reserve = self.config.disk_reserve;
        let needed = plan.unpacked.saturating_add(reserve);
        let free = match self.nix.free_bytes() {
            Ok(free) => free,
            Err(e) => {
                log::warn!(
                    "cannot read the free space of {} ({e}): going ahead",
                    self.nix.store_dir().display()
                );
                return Ok(());
            }
        };
        log::debug!(
            "the update fetches {} paths ({} download, {} unpacked); {} free",
            plan.paths,
            crate::nix::mib(plan.download),
            crate::nix::mib(plan.unpacked),
            crate::nix::mib(free)
        );
        if free >= needed {
            return Ok(());
        }
        let refusal = |free: u64| NixError::DiskSpace {
            paths: plan.paths,
            needed: plan.unpacked,
            download: plan.download,
            free,
            reserve,
            store: self.nix.store_dir(),
        };
        if !self.config.collect_garbage {
            return Err(refusal(free));
        }
        log::info!(
            "the update needs {} more in the store: collecting garbage (every system generation \
             stays)",
            crate::nix::mib(needed - free)
        );
        self.nix
            .collect_garbage(needed - free, &self.cancel)
            .await?;
        let free = self.nix.free_bytes().unwrap_or(0);
        if free >= needed {
            log::info!("garbage collected: {} free", crate::nix::mib(free));
            return Ok(());
        }
        Err(refusal(free))
    }

    async fn realise(
        &mut self,
        verified: &VerifiedRelease,
        toplevel: &str,
    ) -> Result<(), NixError> {
        let root = self.gc_root("candidate");
        if let Some(dir) = root.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let release = verified.release();
        let substituters = self.substituters_for(verified);
        // The realise forces Nix's signature checks itself, so the config check that refuses a
        // host with require-sigs = false can run beside it instead of before it (it costs a
        // `nix show-config`, ~40 ms); its verdict still comes before anything is activated.
        let (sigs, substituted) = tokio::join!(
            self.nix.check_require_sigs(&self.cancel),
            self.nix.substitute(
                toplevel,
                &substituters,
                &root,
                self.config.realise_timeout,
                &self.cancel,
            )
        );
        if let Err(e) = sigs {
            let _ = std::fs::remove_file(&root);
            return Err(e);
        }
        match substituted {
            Err(NixError::NotInCache { .. })
                if self.config.realise == RealiseMode::SubstituteOrBuild =>
            {
                log::warn!(
                    serial = release.serial.to_string().as_str(), store_path = toplevel;
                    "{toplevel} is in no cache: building it from {} at {}",
                    release.source.repo, release.source.commit.as_deref().unwrap_or("(no commit)")
                );
                self.nix
                    .build_from_source(
                        &release.source,
                        &self.config.host,
                        toplevel,
                        &root,
                        self.config.realise_timeout,
                        &self.cancel,
                    )
                    .await?;
            }
            other => other?,
        }
        self.nix.check_toplevel(toplevel)
    }

    /// Activates the candidate with `switch-to-configuration test`, then runs the health window.
    /// With `reboot = "auto"`, a candidate that changes what only a reboot loads is booted
    /// into instead.
    async fn trial(&mut self, serial: u64, toplevel: &str) -> Outcome {
        if self.config.reboot == RebootPolicy::Auto {
            let candidate = self.nix.physical(toplevel);
            let booted =
                crate::nix::resolve_link(&self.config.booted_system).map(|b| self.nix.physical(&b));
            let parts = reboot_parts(&candidate, booted.as_deref());
            if !parts.is_empty() {
                if let Some(waiting) = self.outside_reboot_window(serial) {
                    // Nothing was touched; the realised candidate stays rooted for the window.
                    if let Outcome::Waiting { not_before, .. } = &waiting {
                        log::info!(serial = serial.to_string().as_str(); "release {serial} changes {} and needs a reboot: waiting for the reboot window (opens at {not_before})", parts.join(", "));
                    }
                    if let Some(attempts) = &mut self.state.attempts {
                        attempts.count = attempts.count.saturating_sub(1);
                    }
                    self.awaiting_window = Some((serial, toplevel.to_owned()));
                    if let Err(e) = self.transition(Phase::Idle) {
                        log::error!("{e}");
                    }
                    return waiting;
                }
                self.awaiting_window = None;
                return self.boot_into(serial, toplevel, &parts).await;
            }
        }
        let failed_before = failed_units().await;
        let unit = self.activator.unit_name(Action::Test, serial);
        let phase = Phase::Trial {
            serial,
            toplevel: toplevel.to_owned(),
            unit: unit.clone(),
            failed_before: failed_before.clone(),
        };
        if let Err(e) = self.transition(phase) {
            return self.fail("state_write", e.to_string(), Some(serial));
        }
        let started = Instant::now();
        let switched = self
            .activator
            .switch_in(toplevel, Action::Test, unit.as_deref())
            .await;
        self.durations.record("switch", started);
        if let (true, Some(unit)) = (self.cancel.is_cancelled(), &unit) {
            // Stopping (systemd may have killed our systemd-run client with us): the switch
            // goes on in its own unit, and the next start waits for it and carries on.
            return self.stopped(
                serial,
                format!("stopped while release {serial} is switched in {unit}: the next start picks it up"),
            );
        }
        if let Err(e) = switched {
            let reason = format!("switch-to-configuration test of release {serial} failed: {e}");
            return self
                .rollback(serial, toplevel, "switch_failed", &reason)
                .await;
        }
        failpoint::hit("after-trial-switch");
        self.check(serial, toplevel, failed_before).await
    }

    /// The health window over the active candidate, then commit or rollback.
    async fn check(&mut self, serial: u64, toplevel: &str, failed_before: Vec<String>) -> Outcome {
        let phase = Phase::Health {
            serial,
            toplevel: toplevel.to_owned(),
            failed_before: failed_before.clone(),
        };
        if let Err(e) = self.transition(phase) {
            log::error!("{e}");
            return self
                .rollback(serial, toplevel, "state_write", &e.to_string())
                .await;
        }
        let health = Health {
            config: &self.config,
            failed_before,
        };
        let started = Instant::now();
        let verdict = health.window(&mut self.channel, &self.cancel).await;
        self.durations.record("health", started);
        self.state.last_health = verdict.results.clone();
        if verdict.cancelled {
            // The candidate stays active; the next start runs the window again (or, after a
            // reboot into the last good system, rolls back).
            return self.stopped(
                serial,
                format!("stopped during the health window of release {serial}: the next start runs it again"),
            );
        }
        if !verdict.healthy {
            let reason = format!("release {serial} is unhealthy: {}", verdict.failures());
            return self
                .rollback(serial, toplevel, "health_failed", &reason)
                .await;
        }
        let started = Instant::now();
        let outcome = self.commit(serial, toplevel).await;
        self.durations.record("commit", started);
        outcome
    }

    /// Makes the candidate the boot default and reboots into it; the health window runs after
    /// the boot ([`Self::resume`]).
    async fn boot_into(&mut self, serial: u64, toplevel: &str, parts: &[String]) -> Outcome {
        let phase = Phase::Booting {
            serial,
            toplevel: toplevel.to_owned(),
        };
        if let Err(e) = self.transition(phase) {
            return self.fail("state_write", e.to_string(), Some(serial));
        }
        if let Err((code, reason)) = self.make_boot_default(serial, toplevel).await {
            return self.rollback(serial, toplevel, code, &reason).await;
        }
        log::warn!(
            serial = serial.to_string().as_str(), store_path = toplevel;
            "release {serial} changes {}: rebooting into it; it is checked after the boot",
            parts.join(", ")
        );
        if let Err(e) = self.activator.reboot().await {
            let reason = format!("cannot reboot into release {serial}: {e}");
            return self
                .rollback(serial, toplevel, "reboot_failed", &reason)
                .await;
        }
        Outcome::Rebooting { serial }
    }

    /// After the reboot into a candidate: the health window when the machine booted it, a
    /// rollback otherwise. A rollback from a booted candidate reboots again, into the last good
    /// system.
    async fn resume_boot(&mut self, serial: u64, toplevel: String) -> Outcome {
        let booted = crate::nix::resolve_link(&self.config.booted_system);
        let outcome = if !self.resume_attempt(serial, &toplevel) {
            let reason = format!("release {serial} was booted into too often: giving up on it");
            self.rollback(serial, &toplevel, "interrupted", &reason)
                .await
        } else if booted.as_deref() == Some(toplevel.as_str()) && self.candidate_active(&toplevel) {
            log::info!(serial = serial.to_string().as_str(), store_path = toplevel.as_str(); "booted into release {serial}: running its health window");
            // Everything failed now failed with this boot: no unit is excused.
            self.check(serial, &toplevel, Vec::new()).await
        } else {
            let reason = format!(
                "the machine did not boot release {serial}: it runs {}",
                booted.as_deref().unwrap_or("(unknown)")
            );
            self.rollback(serial, &toplevel, "boot_failed", &reason)
                .await
        };
        let on_candidate = crate::nix::resolve_link(&self.config.booted_system).as_deref()
            == Some(toplevel.as_str());
        if matches!(outcome, Outcome::RolledBack { .. }) && on_candidate {
            log::warn!(serial = serial.to_string().as_str(); "rebooting into the last good system, away from release {serial}");
            match self.activator.reboot().await {
                Ok(()) => return Outcome::Rebooting { serial },
                Err(e) => log::error!("cannot reboot back into the last good system: {e}"),
            }
        }
        outcome
    }

    fn stopped(&mut self, serial: u64, message: String) -> Outcome {
        log::warn!(serial = serial.to_string().as_str(); "{message}");
        Outcome::Stopped { serial, message }
    }

    /// After a restart during the trial or the health window: whether the candidate is active
    /// now, by the running system's link (after a reboot or power cut it is the boot default,
    /// the last committed system, again).
    fn candidate_active(&self, toplevel: &str) -> bool {
        crate::nix::resolve_link(&self.config.current_system).as_deref() == Some(toplevel)
    }

    /// Counts one more attempt at this release; returns the count.
    fn count_attempt(&mut self, serial: u64, toplevel: &str) -> u32 {
        let count = self
            .state
            .attempts
            .as_ref()
            .filter(|a| a.serial == serial && a.toplevel == toplevel)
            .map_or(0, |a| a.count)
            + 1;
        self.state.attempts = Some(Attempts {
            serial,
            toplevel: toplevel.to_owned(),
            count,
        });
        count
    }

    /// Counts a resumed trial as an attempt: a candidate that keeps killing the agent must not
    /// be resumed forever. Returns whether another attempt is allowed.
    fn resume_attempt(&mut self, serial: u64, toplevel: &str) -> bool {
        self.count_attempt(serial, toplevel) <= self.config.max_attempts
    }

    /// Resumes a trial the agent was restarted in: waits for a switch still running in its
    /// transient unit, then runs the health window when the switch succeeded and the candidate
    /// is active; rolls back otherwise.
    async fn resume_trial(
        &mut self,
        serial: u64,
        toplevel: String,
        unit: Option<String>,
        failed_before: Vec<String>,
        in_health: bool,
    ) -> Outcome {
        let interrupted =
            |why: &str| format!("the agent stopped during the trial of release {serial} ({why})");
        if !self.resume_attempt(serial, &toplevel) {
            let reason = interrupted("too often: giving up on it");
            return self
                .rollback(serial, &toplevel, "interrupted", &reason)
                .await;
        }
        if !in_health {
            let Some(unit) = unit else {
                // A direct child died with the agent: its result is lost.
                let reason = interrupted("killed, crashed or power lost");
                return self
                    .rollback(serial, &toplevel, "interrupted", &reason)
                    .await;
            };
            let deadline = Instant::now() + self.config.switch_timeout;
            let result = loop {
                match self.activator.unit_result(&unit).await {
                    crate::activate::UnitResult::Running if Instant::now() < deadline => {
                        log::info!(serial = serial.to_string().as_str(); "resuming: the switch of release {serial} still runs in {unit}: waiting for it");
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    }
                    other => break other,
                }
            };
            match result {
                crate::activate::UnitResult::Ended { success: true, .. } => {}
                crate::activate::UnitResult::Ended { detail, .. } => {
                    let reason = format!(
                        "switch-to-configuration test of release {serial} failed in {unit}: \
                         {detail}"
                    );
                    return self
                        .rollback(serial, &toplevel, "switch_failed", &reason)
                        .await;
                }
                crate::activate::UnitResult::Running => {
                    let reason =
                        format!("switch-to-configuration test of release {serial} timed out");
                    return self
                        .rollback(serial, &toplevel, "switch_failed", &reason)
                        .await;
                }
                crate::activate::UnitResult::Unknown => {
                    let reason = interrupted("its switch left no result: power lost?");
                    return self
                        .rollback(serial, &toplevel, "interrupted", &reason)
                        .await;
                }
            }
        }
        if !self.candidate_active(&toplevel) {
            let reason = interrupted("the machine restarted: it runs its last good system again");
            return self
                .rollback(serial, &toplevel, "interrupted", &reason)
                .await;
        }
        log::info!(serial = serial.to_string().as_str(), store_path = toplevel.as_str(); "resuming: release {serial} is active: running its health window again");
        self.check(serial, &toplevel, failed_before).await
    }

    /// Points the system profile at `toplevel` and makes it the boot default, then checks the
    /// bootloader's config says so; the reason code and reason when any of it fails.
    pub(crate) async fn make_boot_default(
        &mut self,
        serial: u64,
        toplevel: &str,
    ) -> Result<(), (&'static str, String)> {
        self.nix
            .set_profile(&self.config.system_profile, toplevel, &self.cancel)
            .await
            .map_err(|e| {
                let reason = format!("cannot set the system profile to {toplevel}: {e}");
                ("commit_failed", reason)
            })?;
        failpoint::hit("after-profile-set");
        self.activator
            .switch(toplevel, Action::Boot)
            .await
            .map_err(|e| {
                let reason =
                    format!("switch-to-configuration boot of release {serial} failed: {e}");
                ("commit_failed", reason)
            })?;
        match bootloader::read(&self.config.boot_dir) {
            BootDefault::Boots {
                toplevel: boots, ..
            } if boots == toplevel => Ok(()),
            BootDefault::Boots {
                toplevel: boots,
                file,
            } => Err((
                "boot_default_unchanged",
                format!(
                    "switch-to-configuration boot of release {serial} succeeded but the boot \
                     default still boots {boots} ({}), not {toplevel}: the next boot would run \
                     the old system (is a boot loader enabled?)",
                    file.display()
                ),
            )),
            BootDefault::Unreadable { file, why } => {
                log::warn!(serial = serial.to_string().as_str(); "cannot check the boot default in {}: {why}", file.display());
                Ok(())
            }
            BootDefault::Unknown => {
                log::debug!(
                    "no bootloader config under {} to check the boot default in",
                    self.config.boot_dir.display()
                );
                Ok(())
            }
        }
    }

    /// Sets the profile and the boot default to the healthy candidate.
    async fn commit(&mut self, serial: u64, toplevel: &str) -> Outcome {
        let phase = Phase::Committing {
            serial,
            toplevel: toplevel.to_owned(),
        };
        if let Err(e) = self.transition(phase) {
            log::error!("{e}");
            return self
                .rollback(serial, toplevel, "state_write", &e.to_string())
                .await;
        }
        if let Err((code, reason)) = self.make_boot_default(serial, toplevel).await {
            return self.rollback(serial, toplevel, code, &reason).await;
        }
        failpoint::hit("after-boot-switch");
        let candidate = self.nix.physical(toplevel);
        let booted =
            crate::nix::resolve_link(&self.config.booted_system).map(|b| self.nix.physical(&b));
        let parts = reboot_parts(&candidate, booted.as_deref());
        let reboot_needed = !parts.is_empty();
        if reboot_needed {
            log::warn!(
                serial = serial.to_string().as_str(), store_path = toplevel;
                "release {serial} changes {}: it runs fully only after a reboot", parts.join(", ")
            );
        }
        self.state.last_good = Some(toplevel.to_owned());
        self.state.committed_serial = Some(serial);
        self.state.committed_boot = crate::state::boot_id();
        self.state.last_success = Some(unix_now());
        self.state.reboot_needed = reboot_needed;
        self.state.attempts = None;
        self.state.last_error = None;
        self.activator.clear_results();
        let old_root = self.gc_root("candidate");
        let _ = std::fs::rename(&old_root, self.gc_root("last-good"));
        if let Err(e) = self.transition(Phase::Idle) {
            log::error!("{e}");
        }
        log::info!(serial = serial.to_string().as_str(), store_path = toplevel; "release {serial} committed");
        Outcome::Committed {
            serial,
            toplevel: toplevel.to_owned(),
            reboot_needed,
        }
    }

    /// Re-activates the last good system and records the release as bad for this host.
    pub(crate) async fn rollback(
        &mut self,
        serial: u64,
        toplevel: &str,
        code: &str,
        reason: &str,
    ) -> Outcome {
        log::error!(code = code, serial = serial.to_string().as_str(), store_path = toplevel; "{reason}: rolling back");
        let phase = Phase::RollingBack {
            serial,
            toplevel: toplevel.to_owned(),
            code: code.to_owned(),
            reason: reason.to_owned(),
        };
        if let Err(e) = self.transition(phase) {
            log::error!("{e}");
        }
        let Some(last_good) = self.state.last_good.clone() else {
            let message = format!("{reason}; and there is no last good system to go back to");
            self.record_error("rollback_failed", &message, Some(serial));
            return Outcome::RollbackFailed { message };
        };
        if let Err(e) = self.activator.switch(&last_good, Action::Test).await {
            let message = format!(
                "{reason}; then re-activating the last good system {last_good} failed: {e}: the \
                 host needs a person"
            );
            log::error!(code = "rollback_failed", store_path = last_good.as_str(); "{message}");
            self.record_error("rollback_failed", &message, Some(serial));
            return Outcome::RollbackFailed { message };
        }
        failpoint::hit("after-rollback-switch");
        // The profile and boot default were set only if the commit got that far: put them back.
        if crate::nix::resolve_link(&self.config.system_profile).as_deref() == Some(toplevel) {
            if let Err(e) = self
                .nix
                .set_profile(&self.config.system_profile, &last_good, &self.cancel)
                .await
            {
                log::error!("cannot point the system profile back at {last_good}: {e}");
            }
            if let Err(e) = self.activator.switch(&last_good, Action::Boot).await {
                log::error!("cannot make {last_good} the boot default again: {e}");
            }
        }
        let _ = std::fs::remove_file(self.gc_root("candidate"));
        self.activator.clear_results();
        self.state.phase = Phase::Idle;
        self.mark_bad(serial, toplevel, code, reason);
        log::info!(serial = serial.to_string().as_str(), store_path = last_good.as_str(); "back on the last good system {last_good}");
        Outcome::RolledBack {
            serial,
            code: code.to_owned(),
            message: reason.to_owned(),
        }
    }

    /// Finishes or undoes a cycle that a kill, crash or power cut interrupted.
    pub async fn resume(&mut self) -> Option<Outcome> {
        match self.state.phase.clone() {
            Phase::Idle => None,
            Phase::Realising { serial, .. } => {
                log::info!(serial = serial.to_string().as_str(); "resuming: the realise of release {serial} was interrupted; the system was not touched");
                let _ = self.transition(Phase::Idle);
                None
            }
            Phase::Trial {
                serial,
                toplevel,
                unit,
                failed_before,
            } => Some(
                self.resume_trial(serial, toplevel, unit, failed_before, false)
                    .await,
            ),
            Phase::Health {
                serial,
                toplevel,
                failed_before,
            } => Some(
                self.resume_trial(serial, toplevel, None, failed_before, true)
                    .await,
            ),
            Phase::Booting { serial, toplevel } => Some(self.resume_boot(serial, toplevel).await),
            Phase::Committing { serial, toplevel } => {
                log::info!(serial = serial.to_string().as_str(); "resuming: finishing the commit of release {serial}");
                Some(self.commit(serial, &toplevel).await)
            }
            Phase::RollingBack {
                serial,
                toplevel,
                code,
                reason,
            } => Some(self.rollback(serial, &toplevel, &code, &reason).await),
        }
    }
}

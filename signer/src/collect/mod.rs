//! The collector behind `fleet-sign collect`: takes signed host reports, keeps the latest per
//! host (and a short history) in SQLite, and serves the fleet view and Prometheus metrics.
//!
//! A report counts only when it verifies against the `report_key` that the newest signed release
//! lists for the host the report names, and its counter is above the last one accepted from that
//! key. The release comes from the same channel the hosts poll, checked with the same verifier
//! and a serial floor of its own, so whoever can write to the channel without the release keys
//! cannot swap host keys either.

pub mod db;
pub mod server;
pub mod view;

use anyhow::Result;
use db::{Db, Stored, StoredRelease};
use fleet_agent::release::{
    self, Accepted, Fresh, PublicKey, TrustPolicy, VerifiedRelease, VerifyContext, VerifyError,
};
use fleet_agent::report::wire::check_signature;
use fleet_agent::report::{Report, ReportRejection};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

pub use view::{fleet_view, metrics};

/// Reports a host may send in a burst, and how many per second after that.
pub const RATE_BURST: f64 = 60.0;
pub const RATE_PER_SECOND: f64 = 1.0;

/// The newest verified release and the report keys it lists.
pub struct Known {
    pub verified: VerifiedRelease,
    keys: HashMap<String, PublicKey>,
    /// Key name → the host it belongs to, to recognise a host signing for another.
    owners: HashMap<String, String>,
}

impl Known {
    fn new(verified: VerifiedRelease) -> Self {
        let mut keys = HashMap::new();
        let mut owners = HashMap::new();
        for (host, entry) in &verified.release().hosts {
            let Some(key) = entry.report_key.as_deref() else {
                continue;
            };
            match PublicKey::parse(key) {
                Ok(key) => {
                    owners.insert(key.name().to_owned(), host.clone());
                    keys.insert(host.clone(), key);
                }
                Err(e) => log::warn!("release lists an unusable report_key for {host}: {e}"),
            }
        }
        Self {
            verified,
            keys,
            owners,
        }
    }
}

/// Why a report was not stored.
#[derive(Debug)]
pub enum Refusal {
    Rejected(ReportRejection),
    /// The collector itself failed (the database): the host should retry.
    Internal(anyhow::Error),
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

pub struct Collector {
    fleet: String,
    trust: TrustPolicy,
    /// The freshness keys hosts trust, when the fleet uses freshness statements.
    freshness: Option<TrustPolicy>,
    /// The valid freshness statement for the known release, as last read from the channel.
    fresh: RwLock<Option<Fresh>>,
    db: Mutex<Db>,
    known: RwLock<Option<Arc<Known>>>,
    buckets: Mutex<HashMap<String, Bucket>>,
    /// Reports handled since start, by result ("accepted" or a rejection code).
    counts: Mutex<BTreeMap<&'static str, u64>>,
}

impl Collector {
    /// Opens the collector on its database, adopting the release stored there (if any).
    pub fn new(
        fleet: String,
        trust: TrustPolicy,
        freshness: Option<TrustPolicy>,
        db: Db,
    ) -> Result<Self> {
        let stored = db.release()?;
        let collector = Self {
            fleet,
            trust,
            freshness,
            fresh: RwLock::new(None),
            db: Mutex::new(db),
            known: RwLock::new(None),
            buckets: Mutex::new(HashMap::new()),
            counts: Mutex::new(BTreeMap::new()),
        };
        if let Some(stored) = stored {
            if let Err(e) = collector.adopt(&stored) {
                log::warn!("the release stored in the database is refused: {e}");
            }
        }
        Ok(collector)
    }

    pub fn fleet(&self) -> &str {
        &self.fleet
    }

    pub fn known(&self) -> Option<Arc<Known>> {
        self.known
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Whether the fleet uses freshness statements.
    pub fn uses_freshness(&self) -> bool {
        self.freshness.is_some()
    }

    /// The freshness statement last read for the known release, when valid.
    pub fn fresh(&self) -> Option<Fresh> {
        *self
            .fresh
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Checks the channel's freshness statement against the known release and keeps it when
    /// valid (`now`: the collector's clock); returns why not otherwise.
    pub fn check_freshness(
        &self,
        statement: Option<(&[u8], &[u8])>,
        now: u64,
    ) -> Result<(), VerifyError> {
        let (Some(keys), Some(known)) = (&self.freshness, self.known()) else {
            return Ok(());
        };
        let verdict = release::verify_freshness(statement, keys, &known.verified, now);
        *self
            .fresh
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = verdict.as_ref().ok().copied();
        verdict.map(drop)
    }

    /// Takes a release from the channel if it verifies and is not older than the one known.
    /// Returns whether it is new. An expired release still names the hosts' keys: the hosts are
    /// reporting the expiry, and those reports must arrive.
    pub fn adopt(&self, stored: &StoredRelease) -> Result<bool, VerifyError> {
        let floor = self.known().map(|k| Accepted {
            serial: k.verified.serial(),
            digest: k.verified.digest(),
        });
        let context = VerifyContext {
            fleet: self.fleet.clone(),
            now: 0,
            floor,
            own_expiry: false,
        };
        let verified =
            release::verify(&stored.document, &stored.signatures, &self.trust, &context)?
                .with_all_hosts(stored.hosts.as_deref())?;
        if verified.is_same_as(floor) {
            return Ok(false);
        }
        if let Err(e) = self.db.lock().expect("not poisoned").set_release(stored) {
            log::warn!(
                "cannot store release {} in the database: {e:#}",
                verified.serial()
            );
        }
        log::info!(
            "release {} lists {} hosts",
            verified.serial(),
            verified.release().hosts.len()
        );
        *self
            .known
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some(Arc::new(Known::new(verified)));
        Ok(true)
    }

    /// Counts a report the server refused before handing it over (too large to read).
    pub fn refused_early(&self, rejection: &ReportRejection) {
        self.count(rejection.code());
    }

    fn count(&self, result: &'static str) {
        *self
            .counts
            .lock()
            .expect("not poisoned")
            .entry(result)
            .or_default() += 1;
    }

    pub fn counts(&self) -> BTreeMap<&'static str, u64> {
        self.counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Checks a report and stores it.
    pub fn receive(
        &self,
        body: &[u8],
        signature: Option<&str>,
        peer: &str,
        now: u64,
    ) -> Result<Report, Refusal> {
        let result = self.check_and_store(body, signature, peer, now);
        match &result {
            Ok(_) => self.count("accepted"),
            Err(Refusal::Rejected(r)) => self.count(r.code()),
            Err(Refusal::Internal(_)) => self.count("internal_error"),
        }
        result
    }

    fn check_and_store(
        &self,
        body: &[u8],
        signature: Option<&str>,
        peer: &str,
        now: u64,
    ) -> Result<Report, Refusal> {
        let reject = |r| Err(Refusal::Rejected(r));
        let report = Report::parse(body).map_err(Refusal::Rejected)?;
        if report.fleet != self.fleet {
            return reject(ReportRejection::WrongFleet {
                expected: self.fleet.clone(),
                got: report.fleet,
            });
        }
        let Some(known) = self.known() else {
            return reject(ReportRejection::UnknownHost(report.host));
        };
        let Some(key) = known.keys.get(&report.host) else {
            return reject(ReportRejection::UnknownHost(report.host));
        };
        check_signature(body, signature, &report.host, key, |name| {
            let owner = known.owners.get(name)?;
            Some((owner.as_str(), known.keys.get(owner)?))
        })
        .map_err(Refusal::Rejected)?;
        if !self.take_token(&report.host) {
            return reject(ReportRejection::RateLimited(report.host));
        }
        let text = std::str::from_utf8(body)
            .map_err(|e| Refusal::Rejected(ReportRejection::Malformed(e.to_string())))?;
        let stored = self
            .db
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .store(
                &report.host,
                &key.to_string(),
                report.counter,
                now,
                peer,
                text,
            );
        match stored {
            Ok(Stored::Accepted) => Ok(report),
            Ok(Stored::Replay { last }) => reject(ReportRejection::Replay {
                host: report.host,
                counter: report.counter,
                last,
            }),
            Err(e) => Err(Refusal::Internal(e)),
        }
    }

    /// A token bucket per host: only verified reports spend tokens, so nobody can use up
    /// another host's budget with junk.
    fn take_token(&self, host: &str) -> bool {
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        let bucket = buckets.entry(host.to_owned()).or_insert(Bucket {
            tokens: RATE_BURST,
            at: now,
        });
        let refill = now.duration_since(bucket.at).as_secs_f64() * RATE_PER_SECOND;
        bucket.tokens = (bucket.tokens + refill).min(RATE_BURST);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    pub fn latest(&self) -> Result<Vec<db::Latest>> {
        self.db
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .latest()
    }

    pub fn history(&self, host: &str) -> Result<Vec<(u64, u64, String)>> {
        self.db
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .history(host)
    }
}

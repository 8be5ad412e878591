//! The verifier: the only way from unverified bytes to a [`VerifiedRelease`].
//!
//! Order of checks, cheapest and least trusting first: sizes, signatures over the exact bytes
//! (before the JSON parser sees them), structure, fleet, expiry, serial against the floor.

use super::document::{HostEntry, Release, FORMAT_TREE, FORMAT_VERSION};
use super::keys::PublicKey;
use super::signatures::SignatureFile;
use super::{signed_message, MAX_DOCUMENT_BYTES};
use sha2::{Digest as _, Sha256};
use std::fmt;

/// SHA-256 of a document's exact bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    pub fn of(bytes: &[u8]) -> Self {
        Self(Sha256::digest(bytes).into())
    }

    /// Parses 64 lowercase hex digits.
    pub fn from_hex(text: &str) -> Option<Self> {
        if text.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(Self(out))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{self}")
    }
}

/// The keys a host trusts and how many of them must sign.
#[derive(Debug, Clone)]
pub struct TrustPolicy {
    keys: Vec<PublicKey>,
    threshold: usize,
}

impl TrustPolicy {
    /// Refuses a threshold of 0, one above the number of distinct keys, and two keys of one name.
    pub fn new(keys: Vec<PublicKey>, threshold: usize) -> Result<Self, String> {
        for (i, key) in keys.iter().enumerate() {
            if keys[..i].iter().any(|k| k.name() == key.name()) {
                return Err(format!("trusted key name '{}' is listed twice", key.name()));
            }
            if keys[..i].iter().any(|k| k.as_bytes() == key.as_bytes()) {
                return Err(format!(
                    "trusted key '{}' is the same key as another listed one: each key counts once",
                    key.name()
                ));
            }
        }
        if threshold == 0 || threshold > keys.len() {
            return Err(format!(
                "threshold {threshold} is impossible with {} trusted keys: use 1 to {}",
                keys.len(),
                keys.len()
            ));
        }
        Ok(Self { keys, threshold })
    }

    pub fn keys(&self) -> &[PublicKey] {
        &self.keys
    }

    pub fn threshold(&self) -> usize {
        self.threshold
    }
}

/// The highest release a host accepted so far: a new one must not go below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    pub serial: u64,
    pub digest: Digest,
}

/// What the host expects of a release besides signatures.
#[derive(Debug, Clone)]
pub struct VerifyContext {
    /// The fleet (or channel) this host belongs to.
    pub fleet: String,
    /// Unix seconds; callers pass max(clock, persisted time floor) so a host booting in 1970
    /// still refuses an expired release.
    pub now: u64,
    /// The highest release accepted before, if any.
    pub floor: Option<Accepted>,
    /// Whether the release's own `expires` counts. False when the host trusts freshness keys:
    /// then a freshness statement's expiry replaces it (see [`super::freshness`]).
    pub own_expiry: bool,
}

/// A release whose signatures, fleet, expiry and serial have been checked.
#[derive(Debug, Clone)]
pub struct VerifiedRelease {
    pub(super) release: Release,
    digest: Digest,
    signed_by: Vec<String>,
}

impl VerifiedRelease {
    pub fn release(&self) -> &Release {
        &self.release
    }

    pub fn digest(&self) -> Digest {
        self.digest
    }

    pub fn serial(&self) -> u64 {
        self.release.serial
    }

    /// Names of the trusted keys whose signatures counted.
    pub fn signed_by(&self) -> &[String] {
        &self.signed_by
    }

    /// Whether this is the very release accepted before (same serial, same bytes).
    pub fn is_same_as(&self, accepted: Option<Accepted>) -> bool {
        accepted.is_some_and(|a| a.serial == self.release.serial && a.digest == self.digest)
    }

    /// The same release keeping only `host`'s entry: what an agent holds on to between polls,
    /// so its memory does not grow with the fleet.
    pub fn only_host(mut self, host: &str) -> Self {
        self.release.hosts.retain(|name, _| name == host);
        self
    }

    /// This host's entry, or an error naming the host.
    pub fn host(&self, name: &str) -> Result<&HostEntry, VerifyError> {
        self.release
            .hosts
            .get(name)
            .ok_or_else(|| VerifyError::NoEntryForHost {
                host: name.to_owned(),
                serial: self.release.serial,
            })
    }
}

/// Why a release was refused. [`VerifyError::code`] is the stable reason code for reports.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("release document is {size} bytes, the limit is {limit}: refusing")]
    DocumentTooLarge { size: usize, limit: usize },
    #[error("release signature file is unusable: {0}")]
    SignatureFileMalformed(String),
    #[error(
        "release has {valid} valid signature(s) from trusted keys, {threshold} needed{}",
        describe_rejected(.rejected, *.junk_lines)
    )]
    NotEnoughSignatures {
        valid: usize,
        threshold: usize,
        /// (key name, why it did not count) for each signature line that did not count.
        rejected: Vec<(String, &'static str)>,
        junk_lines: usize,
    },
    #[error("release document is malformed: {0}")]
    Malformed(String),
    #[error("release is for fleet '{got}' but this host belongs to fleet '{expected}': refusing")]
    WrongFleet { expected: String, got: String },
    #[error(
        "release serial {serial} expired at {expires}, {} ago (now is {now}, Unix seconds): \
         refusing (sign a new release)",
        ago(*.now, *.expires)
    )]
    Expired { serial: u64, expires: u64, now: u64 },
    #[error(
        "release serial {serial} is older than accepted serial {accepted}: refusing \
         (a rollback must be a new release with a higher serial)"
    )]
    SerialTooLow { serial: u64, accepted: u64 },
    #[error(
        "release serial {serial} was accepted before with other contents ({accepted}, now \
         {got}): refusing, this is a replaced or forged release"
    )]
    SerialReused {
        serial: u64,
        accepted: Digest,
        got: Digest,
    },
    #[error("release serial {serial} has no entry for host '{host}'")]
    NoEntryForHost { host: String, serial: u64 },
    #[error("the entry of host '{host}' in release serial {serial} is refused: {why}")]
    HostProofInvalid {
        host: String,
        serial: u64,
        why: String,
    },
    #[error("the release's host list is refused: {0}")]
    HostListInvalid(String),
    #[error(
        "release serial {serial} has no freshness statement ({}): refusing until one is \
         published (fleet-sign refresh)",
        super::FRESHNESS_FILE
    )]
    FreshnessMissing { serial: u64 },
    #[error("the freshness statement is unusable: {0}")]
    FreshnessInvalid(String),
    #[error(
        "the freshness statement has {valid} valid signature(s) from trusted freshness keys, \
         {threshold} needed{}",
        describe_rejected(.rejected, *.junk_lines)
    )]
    FreshnessUntrusted {
        valid: usize,
        threshold: usize,
        rejected: Vec<(String, &'static str)>,
        junk_lines: usize,
    },
    #[error(
        "the freshness statement is for release serial {stated_serial} ({stated}), the channel \
         holds serial {serial} ({got}): refusing until a statement for this release is published"
    )]
    FreshnessMismatch {
        serial: u64,
        got: Digest,
        stated_serial: u64,
        stated: Digest,
    },
    #[error(
        "release serial {serial} is no longer fresh: its freshness statement expired at \
         {expires}, {} ago (now is {now}, Unix seconds): refusing (run fleet-sign refresh)",
        ago(*.now, *.expires)
    )]
    FreshnessExpired { serial: u64, expires: u64, now: u64 },
}

/// How long ago `then` was, for a person: "3days 2h".
fn ago(now: u64, then: u64) -> String {
    let seconds = now.saturating_sub(then);
    // Whole minutes once it is over an hour: seconds there are noise.
    let rounded = if seconds >= 3600 {
        seconds - seconds % 60
    } else {
        seconds
    };
    humantime::format_duration(std::time::Duration::from_secs(rounded)).to_string()
}

fn describe_rejected(rejected: &[(String, &'static str)], junk: usize) -> String {
    let mut parts: Vec<String> = rejected
        .iter()
        .map(|(name, why)| format!("{name} ({why})"))
        .collect();
    if junk > 0 {
        parts.push(format!("{junk} unreadable line(s)"));
    }
    if parts.is_empty() {
        ": the signature file holds no signatures".into()
    } else {
        format!("; not counted: {}", parts.join(", "))
    }
}

const WHY_UNTRUSTED: &str = "not a trusted key";
const WHY_INVALID: &str = "signature does not match";
const WHY_DUPLICATE: &str = "key already counted";

impl VerifyError {
    /// A short, stable reason code for reports and exit statuses.
    pub fn code(&self) -> &'static str {
        match self {
            Self::DocumentTooLarge { .. } => "too_large",
            Self::SignatureFileMalformed(_) => "signature_malformed",
            Self::NotEnoughSignatures {
                valid,
                rejected,
                junk_lines,
                ..
            } => {
                let untrusted_only = rejected.iter().all(|(_, why)| *why == WHY_UNTRUSTED);
                if rejected.iter().any(|(_, why)| *why == WHY_INVALID) {
                    "signature_invalid"
                } else if *valid > 0 {
                    "below_threshold"
                } else if rejected.is_empty() && *junk_lines == 0 {
                    "signature_missing"
                } else if *junk_lines > 0 {
                    "signature_invalid"
                } else if untrusted_only {
                    "signature_untrusted"
                } else {
                    "below_threshold"
                }
            }
            Self::Malformed(_) => "malformed",
            Self::WrongFleet { .. } => "wrong_fleet",
            Self::Expired { .. } => "expired",
            Self::SerialTooLow { .. } => "serial_too_low",
            Self::SerialReused { .. } => "serial_reused",
            Self::NoEntryForHost { .. } => "no_host_entry",
            Self::HostProofInvalid { .. } => "host_proof_invalid",
            Self::HostListInvalid(_) => "host_list_invalid",
            Self::FreshnessMissing { .. } => "freshness_missing",
            Self::FreshnessInvalid(_) => "freshness_invalid",
            Self::FreshnessUntrusted { .. } => "freshness_untrusted",
            Self::FreshnessMismatch { .. } => "freshness_mismatch",
            Self::FreshnessExpired { .. } => "expired",
        }
    }
}

/// Verifies a release's exact bytes against the host's trust policy and context.
pub fn verify(
    document: &[u8],
    signature_file: &[u8],
    trust: &TrustPolicy,
    context: &VerifyContext,
) -> Result<VerifiedRelease, VerifyError> {
    if document.len() > MAX_DOCUMENT_BYTES {
        return Err(VerifyError::DocumentTooLarge {
            size: document.len(),
            limit: MAX_DOCUMENT_BYTES,
        });
    }
    let signatures =
        SignatureFile::parse(signature_file).map_err(VerifyError::SignatureFileMalformed)?;
    let signed_by = check_signatures(&signed_message(document), &signatures, trust)?;

    let release: Release = serde_json::from_slice(document).map_err(|e| {
        // A newer format has fields this build does not know: say so rather than "unknown field".
        #[derive(serde::Deserialize)]
        struct FormatProbe {
            format: u32,
        }
        match serde_json::from_slice::<FormatProbe>(document) {
            Ok(probe) if probe.format != FORMAT_VERSION && probe.format != FORMAT_TREE => {
                VerifyError::Malformed(format!(
                    "release format {} is not supported (this build reads formats \
                     {FORMAT_VERSION} and {FORMAT_TREE}): upgrade fleet",
                    probe.format
                ))
            }
            _ => VerifyError::Malformed(e.to_string()),
        }
    })?;
    release.validate().map_err(VerifyError::Malformed)?;

    if release.fleet != context.fleet {
        return Err(VerifyError::WrongFleet {
            expected: context.fleet.clone(),
            got: release.fleet,
        });
    }
    if context.own_expiry && context.now >= release.expires {
        return Err(VerifyError::Expired {
            serial: release.serial,
            expires: release.expires,
            now: context.now,
        });
    }
    let digest = Digest::of(document);
    if let Some(floor) = context.floor {
        if release.serial < floor.serial {
            return Err(VerifyError::SerialTooLow {
                serial: release.serial,
                accepted: floor.serial,
            });
        }
        if release.serial == floor.serial && digest != floor.digest {
            return Err(VerifyError::SerialReused {
                serial: release.serial,
                accepted: floor.digest,
                got: digest,
            });
        }
    }
    Ok(VerifiedRelease {
        release,
        digest,
        signed_by,
    })
}

/// Counts valid signatures by distinct trusted keys; returns their names once the threshold is
/// met.
pub(super) fn check_signatures(
    message: &[u8],
    file: &SignatureFile,
    trust: &TrustPolicy,
) -> Result<Vec<String>, VerifyError> {
    let mut counted: Vec<String> = Vec::new();
    let mut rejected = Vec::new();
    for signature in &file.signatures {
        let name = &signature.key_name;
        let why = match trust.keys.iter().find(|k| k.name() == name) {
            None => WHY_UNTRUSTED,
            Some(_) if counted.contains(name) => WHY_DUPLICATE,
            Some(key) if key.verify(message, &signature.bytes) => {
                counted.push(name.clone());
                continue;
            }
            Some(_) => WHY_INVALID,
        };
        rejected.push((name.clone(), why));
    }
    if counted.len() >= trust.threshold {
        Ok(counted)
    } else {
        Err(VerifyError::NotEnoughSignatures {
            valid: counted.len(),
            threshold: trust.threshold,
            rejected,
            junk_lines: file.junk_lines,
        })
    }
}

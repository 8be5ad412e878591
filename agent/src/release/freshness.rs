//! The freshness statement: a short-lived promise that the channel's release is still current.
//!
//! A release is signed by k of n release keys, and gathering them is a ceremony. Freshness is a
//! role of its own (TUF's timestamp role): a key of its own, threshold 1, meant to live on the
//! CI machine or the collector host, signs a small statement naming exactly one release (its
//! serial and the SHA-256 of its exact bytes) and a short expiry. A host that trusts freshness
//! keys requires both: the release, signed by its release keys, and a statement for exactly that
//! release that has not expired; the statement's expiry then replaces the release's own.
//!
//! ```text
//! freshness.json       {"format":1,"fleet":"home","serial":42,"release":"<sha256 hex>",
//!                       "issued_at":1795313883,"expires":1795918683}
//! freshness.json.sig   "<key name>:<base64 signature>" lines over FRESHNESS_DOMAIN || bytes
//! ```
//!
//! A freshness key can never change what a host runs: a statement names a release by digest and
//! carries no host entries, and its signatures use another domain prefix, so they never pass as
//! release signatures (nor release signatures as freshness ones). What a stolen freshness key can
//! do is keep the current release fresh, which is what it is for.

use super::keys::SecretKey;
use super::signatures::SignatureFile;
use super::verify::{check_signatures, Digest, TrustPolicy, VerifiedRelease, VerifyError};
use super::MAX_SIGNATURE_FILE_BYTES;
use serde::{Deserialize, Serialize};

/// Bytes prepended to the statement before signing and verifying.
pub const FRESHNESS_DOMAIN: &[u8] = b"fleet-freshness-v1\0";
/// File name of the statement in a channel.
pub const FRESHNESS_FILE: &str = "freshness.json";
/// File name of the statement's signatures in a channel.
pub const FRESHNESS_SIGNATURE_FILE: &str = "freshness.json.sig";
/// The largest statement accepted.
pub const MAX_FRESHNESS_BYTES: usize = 4 << 10;
/// The statement format this code reads and writes.
pub const FRESHNESS_FORMAT: u32 = 1;
/// The longest a statement may stay valid: 31 days.
pub const MAX_FRESHNESS_LIFETIME: u64 = 31 * 86_400;

/// The statement, as signed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Statement {
    pub format: u32,
    pub fleet: String,
    /// The release's serial.
    pub serial: u64,
    /// SHA-256 of the release document's exact bytes, 64 lowercase hex digits.
    pub release: String,
    pub issued_at: u64,
    pub expires: u64,
}

impl Statement {
    /// A statement for `release`, valid from `now` for `lifetime` seconds.
    pub fn for_release(release: &VerifiedRelease, now: u64, lifetime: u64) -> Self {
        Self::new(
            &release.release().fleet,
            release.serial(),
            release.digest(),
            now,
            now + lifetime,
        )
    }

    /// A statement for release `serial` of `fleet` whose document has `digest`, valid from
    /// `issued_at` to `expires` (tests make them with any times).
    pub fn new(fleet: &str, serial: u64, digest: Digest, issued_at: u64, expires: u64) -> Self {
        Self {
            format: FRESHNESS_FORMAT,
            fleet: fleet.to_owned(),
            serial,
            release: digest.to_string(),
            issued_at,
            expires,
        }
    }

    /// The bytes published: pretty JSON with a final newline.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = serde_json::to_vec_pretty(self).expect("a statement serializes");
        bytes.push(b'\n');
        bytes
    }

    /// The bytes published and a signature file over them by `keys`.
    pub fn sign(&self, keys: &[&SecretKey]) -> (Vec<u8>, Vec<u8>) {
        let bytes = self.to_bytes();
        let signatures = SignatureFile::sign_message(&freshness_message(&bytes), keys).render();
        (bytes, signatures.into_bytes())
    }
}

/// The message a freshness signature covers.
pub fn freshness_message(statement: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(FRESHNESS_DOMAIN.len() + statement.len());
    message.extend_from_slice(FRESHNESS_DOMAIN);
    message.extend_from_slice(statement);
    message
}

/// A verified statement for a verified release.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fresh {
    pub issued_at: u64,
    pub expires: u64,
}

impl Fresh {
    /// Whether the statement has lived half its life by `now`: time to look for a newer one.
    pub fn is_aging(&self, now: u64) -> bool {
        now >= self.issued_at + (self.expires - self.issued_at) / 2
    }
}

/// Checks a statement (`None`: the channel holds none) against the keys that may sign it and
/// the verified release it must name. `now` is max(clock, time floor), as for the release.
pub fn verify_freshness(
    statement: Option<(&[u8], &[u8])>,
    keys: &TrustPolicy,
    release: &VerifiedRelease,
    now: u64,
) -> Result<Fresh, VerifyError> {
    let serial = release.serial();
    let Some((document, signatures)) = statement else {
        return Err(VerifyError::FreshnessMissing { serial });
    };
    if document.len() > MAX_FRESHNESS_BYTES {
        return Err(VerifyError::FreshnessInvalid(format!(
            "it is {} bytes, the limit is {MAX_FRESHNESS_BYTES}",
            document.len()
        )));
    }
    if signatures.len() > MAX_SIGNATURE_FILE_BYTES {
        return Err(VerifyError::FreshnessInvalid(format!(
            "its signature file is {} bytes, the limit is {MAX_SIGNATURE_FILE_BYTES}",
            signatures.len()
        )));
    }
    let file = SignatureFile::parse(signatures).map_err(VerifyError::FreshnessInvalid)?;
    check_signatures(&freshness_message(document), &file, keys).map_err(|e| match e {
        VerifyError::NotEnoughSignatures {
            valid,
            threshold,
            rejected,
            junk_lines,
        } => VerifyError::FreshnessUntrusted {
            valid,
            threshold,
            rejected,
            junk_lines,
        },
        other => other,
    })?;
    let statement: Statement = serde_json::from_slice(document)
        .map_err(|e| VerifyError::FreshnessInvalid(e.to_string()))?;
    if statement.format != FRESHNESS_FORMAT {
        return Err(VerifyError::FreshnessInvalid(format!(
            "statement format {} is not supported (this build reads format \
             {FRESHNESS_FORMAT}): upgrade fleet",
            statement.format
        )));
    }
    if statement.expires <= statement.issued_at
        || statement.expires - statement.issued_at > MAX_FRESHNESS_LIFETIME
    {
        return Err(VerifyError::FreshnessInvalid(format!(
            "it is valid from {} to {}: the lifetime must be positive and at most {} days",
            statement.issued_at,
            statement.expires,
            MAX_FRESHNESS_LIFETIME / 86_400
        )));
    }
    if statement.fleet != release.release().fleet {
        return Err(VerifyError::WrongFleet {
            expected: release.release().fleet.clone(),
            got: statement.fleet,
        });
    }
    let stated = Digest::from_hex(&statement.release).ok_or_else(|| {
        VerifyError::FreshnessInvalid("its release digest is not 64 lowercase hex digits".into())
    })?;
    if statement.serial != serial || stated != release.digest() {
        return Err(VerifyError::FreshnessMismatch {
            serial,
            got: release.digest(),
            stated_serial: statement.serial,
            stated,
        });
    }
    if now >= statement.expires {
        return Err(VerifyError::FreshnessExpired {
            serial,
            expires: statement.expires,
            now,
        });
    }
    Ok(Fresh {
        issued_at: statement.issued_at,
        expires: statement.expires,
    })
}

//! The signed report, as it travels from a host to the collector (pure code, no I/O).
//!
//! ```text
//! POST <collector>/v1/report
//! Content-Type: application/json
//! Fleet-Signature: <key name>:<base64 of ed25519 over REPORT_DOMAIN || body>
//!
//! {"format":1,"fleet":"home","host":"router1","counter":1790000000000001,…}
//! ```
//!
//! The body is the report's exact bytes; the signature covers them behind a domain prefix of its
//! own, so a report signature can never pass for a release signature or a Nix narinfo signature.
//! The collector checks it against the `report_key` the newest signed release lists for the host
//! the body names. `counter` rises with every report a host makes (also across restarts), so the
//! collector can refuse a replay by comparing it with the last counter it accepted.

use crate::health::CheckResult;
use crate::release::{is_valid_name, PublicKey, SecretKey, Signature, StorePath};
use serde::{Deserialize, Serialize};

/// The report format version.
pub const REPORT_FORMAT: u32 = 1;
/// Bytes prepended to the body before signing and verifying.
pub const REPORT_DOMAIN: &[u8] = b"fleet-report-v1\0";
/// The largest report body accepted.
pub const MAX_REPORT_BYTES: usize = 64 << 10;
/// The HTTP header carrying the signature line.
pub const SIGNATURE_HEADER: &str = "Fleet-Signature";
/// The collector's path for reports.
pub const REPORT_PATH: &str = "/v1/report";
/// The most health results one report carries, and the longest detail of each.
pub const MAX_CHECKS: usize = 64;
pub const MAX_DETAIL: usize = 512;
/// The longest error message a report carries.
pub const MAX_MESSAGE: usize = 4096;

/// Why the report was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Event {
    /// The agent started.
    Start,
    /// The deploy cycle moved to another phase.
    Phase,
    /// A cycle ended with an outcome worth telling (not an idle "up to date").
    Outcome,
    /// Nothing happened for a while: the host is alive.
    Heartbeat,
}

/// One report: everything the collector shows about a host, as of `time`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Report {
    pub format: u32,
    pub fleet: String,
    pub host: String,
    /// Rises with every report this host makes.
    pub counter: u64,
    /// When the report was made (Unix seconds, by the host's clock).
    pub time: u64,
    pub agent_version: String,
    pub event: Event,
    /// The deploy phase: idle, realising, trial, health, committing, rolling-back.
    pub phase: String,
    /// The release the phase is about, while not idle.
    pub target: Option<u64>,
    /// The release the committed system came from, once the agent committed one.
    pub committed: Option<u64>,
    /// The highest release this host verified.
    pub accepted: Option<u64>,
    /// How the last cycle ended (`committed`, `rolled-back`, `refused`, …), once one did.
    pub outcome: Option<String>,
    /// The standing error, if any.
    pub error: Option<ReportError>,
    /// The running system.
    pub current: Option<String>,
    /// The system being tried, during a deploy.
    pub candidate: Option<String>,
    /// The committed system.
    pub last_good: Option<String>,
    /// The last health window's results.
    pub health: Vec<CheckResult>,
    /// The committed system needs a reboot to run its kernel or initrd.
    pub reboot_needed: bool,
    /// When a release was last committed (Unix seconds).
    pub last_success: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportError {
    pub code: String,
    pub message: String,
    /// When it happened (Unix seconds).
    pub at: u64,
}

/// Why a report was refused. [`ReportRejection::code`] is what the collector answers with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportRejection {
    #[error("report is {got} bytes, the limit is {MAX_REPORT_BYTES}")]
    TooLarge { got: usize },
    #[error("report is malformed: {0}")]
    Malformed(String),
    #[error("the {SIGNATURE_HEADER} header is missing or not '<key name>:<base64>'")]
    NoSignature,
    #[error("report is for fleet '{got}', not '{expected}'")]
    WrongFleet { expected: String, got: String },
    #[error("host '{0}' is not in the newest release, or has no report_key there")]
    UnknownHost(String),
    #[error("report for host '{host}' is signed by the key of host '{signer}'")]
    CrossHost { host: String, signer: String },
    #[error("report for host '{0}' does not carry a valid signature by its key")]
    Forged(String),
    #[error("report {counter} of host '{host}' is not above the last accepted ({last}): replay")]
    Replay {
        host: String,
        counter: u64,
        last: u64,
    },
    #[error("host '{0}' sends reports faster than the collector accepts them")]
    RateLimited(String),
}

impl ReportRejection {
    /// A short, stable reason code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::TooLarge { .. } => "too_large",
            Self::Malformed(_) => "malformed",
            Self::NoSignature => "no_signature",
            Self::WrongFleet { .. } => "wrong_fleet",
            Self::UnknownHost(_) => "unknown_host",
            Self::CrossHost { .. } => "cross_host",
            Self::Forged(_) => "forged",
            Self::Replay { .. } => "replay",
            Self::RateLimited(_) => "rate_limited",
        }
    }

    /// The HTTP status the collector answers with.
    pub fn status(&self) -> u16 {
        match self {
            Self::TooLarge { .. } => 413,
            Self::Malformed(_) | Self::NoSignature | Self::WrongFleet { .. } => 400,
            Self::UnknownHost(_) | Self::CrossHost { .. } | Self::Forged(_) => 403,
            Self::Replay { .. } => 409,
            Self::RateLimited(_) => 429,
        }
    }
}

/// The message a report signature covers.
pub fn signed_message(body: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(REPORT_DOMAIN.len() + body.len());
    message.extend_from_slice(REPORT_DOMAIN);
    message.extend_from_slice(body);
    message
}

impl Report {
    /// Serializes and signs: the body and the signature header's value.
    pub fn sign(&self, key: &SecretKey) -> (Vec<u8>, String) {
        let body = serde_json::to_vec(self).expect("report serializes");
        let signature = Signature {
            key_name: key.name().to_owned(),
            bytes: key.sign(&signed_message(&body)),
        };
        (body, signature.to_line())
    }

    /// Parses a body and checks what can be checked without keys: size, syntax, names, paths.
    pub fn parse(body: &[u8]) -> Result<Self, ReportRejection> {
        if body.len() > MAX_REPORT_BYTES {
            return Err(ReportRejection::TooLarge { got: body.len() });
        }
        let report: Report =
            serde_json::from_slice(body).map_err(|e| ReportRejection::Malformed(e.to_string()))?;
        let malformed = |what: String| Err(ReportRejection::Malformed(what));
        if report.format != REPORT_FORMAT {
            return malformed(format!("format {} is not {REPORT_FORMAT}", report.format));
        }
        if !is_valid_name(&report.host) || !is_valid_name(&report.fleet) {
            return malformed("host or fleet is not a valid name".into());
        }
        for path in [&report.current, &report.candidate, &report.last_good]
            .into_iter()
            .flatten()
        {
            if let Err(e) = StorePath::parse(path) {
                return malformed(e);
            }
        }
        if report.health.len() > MAX_CHECKS {
            return malformed(format!("more than {MAX_CHECKS} health results"));
        }
        Ok(report)
    }
}

/// Checks a signature header against the body and a host's key: which key signed, if it is
/// `key`. `others` names the key owners the collector knows, to tell a host reporting for
/// another ([`ReportRejection::CrossHost`]) from a forgery.
pub fn check_signature<'a>(
    body: &[u8],
    header: Option<&str>,
    host: &str,
    key: &PublicKey,
    others: impl Fn(&str) -> Option<(&'a str, &'a PublicKey)>,
) -> Result<(), ReportRejection> {
    let signature = header
        .and_then(|h| crate::release::SignatureFile::parse(h.as_bytes()).ok())
        .and_then(|file| file.signatures.into_iter().next())
        .ok_or(ReportRejection::NoSignature)?;
    let message = signed_message(body);
    if signature.key_name == key.name() && key.verify(&message, &signature.bytes) {
        return Ok(());
    }
    if let Some((signer, other)) = others(&signature.key_name) {
        if signer != host && other.verify(&message, &signature.bytes) {
            return Err(ReportRejection::CrossHost {
                host: host.to_owned(),
                signer: signer.to_owned(),
            });
        }
    }
    Err(ReportRejection::Forged(host.to_owned()))
}

/// Shortens a text to at most `max` bytes (and an ellipsis).
pub fn clip(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

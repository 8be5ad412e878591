//! The detached signature file, `release.json.sig`.
//!
//! ```text
//! <key name>:<base64 of the 64-byte ed25519 signature over DOMAIN || document>\n
//! ```
//!
//! One line per signature, UTF-8, at most [`super::MAX_SIGNATURES`] lines and
//! [`super::MAX_SIGNATURE_FILE_BYTES`] bytes. Empty lines and lines starting with `#` are
//! ignored. A line that does not parse is kept as junk: it never counts towards the threshold,
//! and it does not spoil the signatures beside it (so adding a key cannot break old agents).

use super::keys::is_valid_key_name;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

/// One parsed signature line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    pub key_name: String,
    pub bytes: [u8; 64],
}

/// A parsed signature file: the signatures, and how many lines were junk.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SignatureFile {
    pub signatures: Vec<Signature>,
    pub junk_lines: usize,
}

impl Signature {
    fn parse_line(line: &str) -> Option<Self> {
        let (name, payload) = line.split_once(':')?;
        if !is_valid_key_name(name) {
            return None;
        }
        let bytes: [u8; 64] = STANDARD.decode(payload).ok()?.try_into().ok()?;
        Some(Self {
            key_name: name.to_owned(),
            bytes,
        })
    }

    pub fn to_line(&self) -> String {
        format!("{}:{}", self.key_name, STANDARD.encode(self.bytes))
    }
}

impl SignatureFile {
    /// Signs `document` with each key: the signature file `fleet-sign release` writes.
    pub fn sign(document: &[u8], keys: &[&super::SecretKey]) -> Self {
        Self::sign_message(&super::signed_message(document), keys)
    }

    /// Signs a message that already holds its domain prefix.
    pub fn sign_message(message: &[u8], keys: &[&super::SecretKey]) -> Self {
        Self {
            signatures: keys
                .iter()
                .map(|key| Signature {
                    key_name: key.name().to_owned(),
                    bytes: key.sign(message),
                })
                .collect(),
            junk_lines: 0,
        }
    }

    /// Parses the file's lines; fails only when the file as a whole is unusable.
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() > super::MAX_SIGNATURE_FILE_BYTES {
            return Err(format!(
                "signature file is {} bytes, the limit is {}",
                bytes.len(),
                super::MAX_SIGNATURE_FILE_BYTES
            ));
        }
        let text = std::str::from_utf8(bytes).map_err(|_| "signature file is not UTF-8")?;
        let mut file = SignatureFile::default();
        let lines = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'));
        for (count, line) in lines.enumerate() {
            if count == super::MAX_SIGNATURES {
                return Err(format!(
                    "signature file has more than {} signatures",
                    super::MAX_SIGNATURES
                ));
            }
            match Signature::parse_line(line) {
                Some(signature) => file.signatures.push(signature),
                None => file.junk_lines += 1,
            }
        }
        Ok(file)
    }

    /// The file's text: one line per signature, each ending in a newline.
    pub fn render(&self) -> String {
        self.signatures.iter().map(|s| s.to_line() + "\n").collect()
    }
}

//! ed25519 keys in Nix's text format.
//!
//! ```text
//! public:  <name>:<base64 of the 32-byte public key>
//! secret:  <name>:<base64 of 64 bytes: 32-byte seed, then the 32-byte public key>
//! ```
//!
//! This is what `nix-store --generate-binary-cache-key` and `nix key generate-secret` write, so
//! keys made by either work as release keys. The name is free text without `:` or white space;
//! by convention it says who holds the key (`ops-2026`, `ci.example.org-1`).

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use std::fmt;

/// Why a key could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("key has no name: expected '<name>:<base64>' as Nix writes it")]
    MissingName,
    #[error("key name '{0}' is invalid: use letters, digits and '.-_+', at most 128 characters")]
    BadName(String),
    #[error("key '{name}' is not valid base64")]
    BadBase64 { name: String },
    #[error("key '{name}' has {got} bytes, expected {expected} (is this a {other} key?)")]
    BadLength {
        name: String,
        got: usize,
        expected: usize,
        other: &'static str,
    },
    #[error("key '{0}' is not a valid ed25519 public key")]
    BadPoint(String),
    #[error("secret key '{0}' is inconsistent: its public half does not match its seed")]
    Inconsistent(String),
}

/// A named ed25519 public key.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    name: String,
    key: VerifyingKey,
}

/// A named ed25519 secret key. Its `Debug` never shows the secret.
#[derive(Clone)]
pub struct SecretKey {
    name: String,
    key: SigningKey,
}

fn split_key(text: &str) -> Result<(&str, Vec<u8>), KeyError> {
    let text = text.trim();
    let (name, payload) = text.split_once(':').ok_or(KeyError::MissingName)?;
    if name.is_empty() {
        return Err(KeyError::MissingName);
    }
    if !is_valid_key_name(name) {
        return Err(KeyError::BadName(name.to_owned()));
    }
    let bytes = STANDARD.decode(payload).map_err(|_| KeyError::BadBase64 {
        name: name.to_owned(),
    })?;
    Ok((name, bytes))
}

/// Key names: 1 to 128 characters from `[A-Za-z0-9._+-]`.
pub(crate) fn is_valid_key_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._+-".contains(&b))
}

impl PublicKey {
    /// Parses `name:base64(32 bytes)`.
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        let (name, bytes) = split_key(text)?;
        let bytes: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| KeyError::BadLength {
                name: name.to_owned(),
                got: bytes.len(),
                expected: 32,
                other: "secret",
            })?;
        let key = VerifyingKey::from_bytes(&bytes).map_err(|_| KeyError::BadPoint(name.into()))?;
        Ok(Self {
            name: name.to_owned(),
            key,
        })
    }

    /// Checks the text form (name, base64, 32 bytes) without decoding the curve point.
    pub fn check_syntax(text: &str) -> Result<(), KeyError> {
        let (name, bytes) = split_key(text)?;
        if bytes.len() != 32 {
            return Err(KeyError::BadLength {
                name: name.to_owned(),
                got: bytes.len(),
                expected: 32,
                other: "secret",
            });
        }
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Checks an ed25519 signature over `message` (strict: no malleable signatures).
    pub fn verify(&self, message: &[u8], signature: &[u8; 64]) -> bool {
        let signature = ed25519_dalek::Signature::from_bytes(signature);
        self.key.verify_strict(message, &signature).is_ok()
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        self.key.as_bytes()
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, STANDARD.encode(self.key.as_bytes()))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl SecretKey {
    /// Parses `name:base64(64 bytes)` as written by Nix, checking that both halves agree.
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        let (name, bytes) = split_key(text)?;
        let bytes: [u8; 64] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| KeyError::BadLength {
                name: name.to_owned(),
                got: bytes.len(),
                expected: 64,
                other: "public",
            })?;
        let key = SigningKey::from_keypair_bytes(&bytes)
            .map_err(|_| KeyError::Inconsistent(name.to_owned()))?;
        Ok(Self {
            name: name.to_owned(),
            key,
        })
    }

    /// Makes a key from a 32-byte seed (the caller supplies the randomness).
    pub fn from_seed(name: &str, seed: [u8; 32]) -> Result<Self, KeyError> {
        if !is_valid_key_name(name) {
            return Err(KeyError::BadName(name.to_owned()));
        }
        Ok(Self {
            name: name.to_owned(),
            key: SigningKey::from_bytes(&seed),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn public(&self) -> PublicKey {
        PublicKey {
            name: self.name.clone(),
            key: self.key.verifying_key(),
        }
    }

    /// Signs `message` as is; release signing goes through [`super::signed_message`].
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.key.sign(message).to_bytes()
    }

    /// The Nix text form, `name:base64(seed || public)`: write it only to a file of mode 0600.
    pub fn to_nix_string(&self) -> String {
        format!(
            "{}:{}",
            self.name,
            STANDARD.encode(self.key.to_keypair_bytes())
        )
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({}:<redacted>)", self.name)
    }
}

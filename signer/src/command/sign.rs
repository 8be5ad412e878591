//! `fleet-sign sign`: add your signature to the release a channel holds, for fleets whose hosts
//! need signatures from several key holders (a `--cosign` release).

use super::{now, SigningArgs};
use crate::channel::Published;
use crate::config::Loaded;
use anyhow::{Context as _, Result};
use fleet_agent::release::{
    self, Release, SecretKey, SignatureFile, VerifyContext, VerifyError, MAX_SIGNATURES,
    SIGNATURE_FILE,
};
use std::path::PathBuf;

/// Add signatures to a published release, without changing its document.
#[derive(clap::Args)]
pub struct Args {
    /// A channel holding the release; repeat for several: the first is read, every one is
    /// written, and all must hold the same document (default: channels from the config).
    #[arg(long = "channel")]
    channels: Vec<String>,
    #[command(flatten)]
    signing: SigningArgs,
    /// The fleet the release must be for (default: from the config).
    #[arg(long)]
    fleet: Option<String>,
    /// Config file (default: ./fleet.toml if present).
    #[arg(long)]
    config: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<()> {
    let config = Loaded::load(args.config.as_deref())?;
    let (keys, trust) = args.signing.resolve(&config)?;
    let channels = config.channels(&args.channels)?;
    let Some(first) = channels.first() else {
        return Err(crate::usage(
            "no channel: give --channel or set channels in fleet.toml",
        ));
    };
    let current = first
        .read_for_update()
        .with_context(|| format!("could not read the release from {first}"))?
        .ok_or_else(|| crate::usage(format!("{first} holds no release to sign")))?;
    for channel in &channels[1..] {
        let other = channel
            .read_for_update()
            .with_context(|| format!("could not read the release from {channel}"))?;
        if other.as_ref().map(|o| &o.document) != Some(&current.document) {
            return Err(crate::usage(format!(
                "{channel} does not hold the same release document as {first}: refusing to sign \
                 (sign each release on its own)"
            )));
        }
    }
    // Sign only what parses as a release for this fleet: a signature is a promise.
    let document: Release = serde_json::from_slice(&current.document).map_err(|e| {
        crate::usage(format!(
            "the release in {first} is not a valid release: {e}"
        ))
    })?;
    document
        .validate()
        .map_err(|e| crate::usage(format!("the release in {first} is not valid: {e}")))?;
    if let Some(fleet) = args.fleet.clone().or(config.raw.fleet.clone()) {
        if document.fleet != fleet {
            return Err(crate::usage(format!(
                "the release in {first} is for fleet '{}', not '{fleet}': refusing to sign",
                document.fleet
            )));
        }
    }

    // A signature by a key the hosts do not trust counts for nothing: say so, publish nothing.
    let untrusted: Vec<&str> = keys
        .iter()
        .filter(|k| {
            !trust
                .keys()
                .iter()
                .any(|t| t.as_bytes() == k.public().as_bytes())
        })
        .map(|k| k.name())
        .collect();
    if !untrusted.is_empty() {
        return Err(crate::refusal(
            "signature_untrusted",
            format!(
                "signature_untrusted: {} not among the keys hosts trust ({}): the signature would \
             count for nothing; refusing to publish it (check --key and trusted_keys)",
                untrusted.join(", "),
                trust
                    .keys()
                    .iter()
                    .map(|k| k.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    let existing = SignatureFile::parse(&current.signatures).unwrap_or_default();
    let mut signatures = SignatureFile {
        signatures: existing
            .signatures
            .into_iter()
            .filter(|s| !keys.iter().any(|k| k.name() == s.key_name))
            .collect(),
        junk_lines: 0,
    };
    let refs: Vec<&SecretKey> = keys.iter().collect();
    signatures
        .signatures
        .extend(SignatureFile::sign(&current.document, &refs).signatures);
    if signatures.signatures.len() > MAX_SIGNATURES {
        return Err(crate::usage(format!(
            "the release would carry more than {MAX_SIGNATURES} signatures"
        )));
    }
    let signed = Published {
        signatures: signatures.render().into_bytes(),
        ..current.clone()
    };
    let names: Vec<&str> = keys.iter().map(|k| k.name()).collect();
    let message = format!(
        "fleet {} release {}: signed by {}\n",
        document.fleet,
        document.serial,
        names.join(", ")
    );
    // Where the release will stand, as hosts will see it: checked before anything is published.
    let context = VerifyContext {
        fleet: document.fleet.clone(),
        now: now(),
        floor: None,
        own_expiry: true,
    };
    let verdict = release::verify(&signed.document, &signed.signatures, &trust, &context);
    if let Err(e) = &verdict {
        // Waiting for co-signers is the point of signing; an expired release is still
        // published (and reported below), as it was asked for.
        if !matches!(
            e,
            VerifyError::NotEnoughSignatures { .. } | VerifyError::Expired { .. }
        ) {
            return Err(anyhow::Error::new(e.clone())
                .context("the signed release would not verify: nothing published"));
        }
    }
    for channel in &channels {
        // Only the signature file changes: the document, its freshness statement (which names
        // the document, not its signatures) and a format-2 release's pieces stay.
        let place = channel
            .update(
                &signed.document,
                &[(SIGNATURE_FILE, &signed.signatures)],
                &message,
            )
            .with_context(|| format!("could not publish to {channel}"))?;
        eprintln!("signed release {} in {channel} ({place})", document.serial);
    }
    match verdict {
        Ok(verified) => println!(
            "release {} is complete: signed by {} ({} of {} needed)",
            document.serial,
            verified.signed_by().join(", "),
            verified.signed_by().len(),
            trust.threshold()
        ),
        Err(VerifyError::NotEnoughSignatures {
            valid, threshold, ..
        }) => println!(
            "release {} has {valid} of the {threshold} signatures hosts need: waiting for more \
             (fleet-sign sign by the other key holders)",
            document.serial
        ),
        Err(e) => return Err(anyhow::Error::new(e).context("the signed release does not verify")),
    }
    Ok(())
}

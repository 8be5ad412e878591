//! Unit tests of the release format and verifier: table-driven refusals.

use super::*;
use std::collections::BTreeMap;

const NOW: u64 = 1_800_000_000;
const TOPLEVEL: &str = "/nix/store/a1ps8nbkrhi4d52m2i2gzmv345rmsanm-nixos-system-a-test";

fn key(name: &str, seed: u8) -> SecretKey {
    SecretKey::from_seed(name, [seed; 32]).unwrap()
}

fn release(serial: u64) -> Release {
    let mut hosts = BTreeMap::new();
    hosts.insert(
        "a".to_owned(),
        HostEntry {
            toplevel: StorePath::parse(TOPLEVEL).unwrap(),
            wave: Some(0),
            not_before: None,
            target: None,
            previous: None,
            held: false,
            report_key: Some(key("a", 9).public().to_string()),
        },
    );
    Release {
        format: FORMAT_VERSION,
        fleet: "home".into(),
        serial,
        issued_at: NOW - 10,
        expires: NOW + 3600,
        source: Source {
            repo: "git+file:///srv/fleet".into(),
            commit: Some("56697b0912ba35bff5f5d74e6c61a31052c3f1fc".into()),
        },
        substituters: vec!["http://127.0.0.1:5000".into()],
        hosts,
        host_tree: None,
        rollout: None,
    }
}

fn document(serial: u64) -> Vec<u8> {
    serde_json::to_vec_pretty(&release(serial)).unwrap()
}

fn sign(document: &[u8], keys: &[&SecretKey]) -> Vec<u8> {
    SignatureFile::sign(document, keys).render().into_bytes()
}

fn trust(keys: &[&SecretKey], threshold: usize) -> TrustPolicy {
    TrustPolicy::new(keys.iter().map(|k| k.public()).collect(), threshold).unwrap()
}

fn context() -> VerifyContext {
    VerifyContext {
        fleet: "home".into(),
        now: NOW,
        floor: None,
        own_expiry: true,
    }
}

fn code(result: Result<VerifiedRelease, VerifyError>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(e) => e.code(),
    }
}

#[test]
fn round_trip_accepts_and_exposes_host() {
    let (k1, doc) = (key("ops1", 1), document(5));
    let verified = verify(&doc, &sign(&doc, &[&k1]), &trust(&[&k1], 1), &context()).unwrap();
    assert_eq!(verified.serial(), 5);
    assert_eq!(verified.signed_by(), ["ops1"]);
    assert_eq!(verified.host("a").unwrap().toplevel.as_str(), TOPLEVEL);
    assert_eq!(verified.host("b").unwrap_err().code(), "no_host_entry");
}

#[test]
fn signature_rows() {
    let (k1, k2, k3, evil) = (
        key("ops1", 1),
        key("ops2", 2),
        key("ops3", 3),
        key("evil", 4),
    );
    // An attacker's key that reuses a trusted name.
    let impostor = key("ops2", 5);
    let doc = document(5);
    let other_doc = document(6);
    let both = |a: Vec<u8>, b: Vec<u8>| [a, b].concat();
    #[rustfmt::skip]
    let rows: Vec<(&str, Vec<u8>, TrustPolicy, &str)> = vec![
        ("one of one", sign(&doc, &[&k1]), trust(&[&k1], 1), "ok"),
        ("two of three", sign(&doc, &[&k1, &k3]), trust(&[&k1, &k2, &k3], 2), "ok"),
        ("no signatures", Vec::new(), trust(&[&k1], 1), "signature_missing"),
        ("comments only", b"# nothing\n\n".to_vec(), trust(&[&k1], 1), "signature_missing"),
        ("foreign key", sign(&doc, &[&evil]), trust(&[&k1], 1), "signature_untrusted"),
        ("impostor with trusted name", sign(&doc, &[&impostor]), trust(&[&k2], 1), "signature_invalid"),
        ("signature of another document", sign(&other_doc, &[&k1]), trust(&[&k1], 1), "signature_invalid"),
        ("duplicate counted once", sign(&doc, &[&k1, &k1]), trust(&[&k1, &k2], 2), "below_threshold"),
        ("below threshold", sign(&doc, &[&k1]), trust(&[&k1, &k2, &k3], 2), "below_threshold"),
        ("junk extra line tolerated", both(sign(&doc, &[&k1]), b"garbage line\n".to_vec()), trust(&[&k1], 1), "ok"),
        ("junk extra foreign signature tolerated", sign(&doc, &[&evil, &k1]), trust(&[&k1], 1), "ok"),
        ("bad extra signature tolerated", both(sign(&other_doc, &[&k2]), sign(&doc, &[&k1])), trust(&[&k1, &k2], 1), "ok"),
        ("corrupted only", b"ops1:notbase64\n".to_vec(), trust(&[&k1], 1), "signature_invalid"),
        ("not utf-8", vec![0xff, 0xfe], trust(&[&k1], 1), "signature_malformed"),
        ("oversized signature file", vec![b'#'; MAX_SIGNATURE_FILE_BYTES + 1], trust(&[&k1], 1), "signature_malformed"),
        ("too many lines", sign(&doc, &vec![&evil; MAX_SIGNATURES + 1]), trust(&[&k1], 1), "signature_malformed"),
    ];
    for (what, signatures, trust, expected) in rows {
        assert_eq!(
            code(verify(&doc, &signatures, &trust, &context())),
            expected,
            "{what}"
        );
    }
}

#[test]
fn every_single_byte_change_is_refused() {
    let k1 = key("ops1", 1);
    let doc = document(5);
    let signatures = sign(&doc, &[&k1]);
    let trust = trust(&[&k1], 1);
    for i in 0..doc.len() {
        for flip in [0x01u8, 0x80] {
            let mut tampered = doc.clone();
            tampered[i] ^= flip;
            assert_eq!(
                code(verify(&tampered, &signatures, &trust, &context())),
                "signature_invalid",
                "byte {i} xor {flip:#x}"
            );
        }
    }
    let mut longer = doc.clone();
    longer.push(b'\n');
    assert_eq!(
        code(verify(&longer, &signatures, &trust, &context())),
        "signature_invalid"
    );
    let shorter = &doc[..doc.len() - 1];
    assert_eq!(
        code(verify(shorter, &signatures, &trust, &context())),
        "signature_invalid"
    );
}

#[test]
fn context_rows() {
    let k1 = key("ops1", 1);
    let trust = trust(&[&k1], 1);
    let doc = document(5);
    let accepted = |serial, doc: &[u8]| {
        Some(Accepted {
            serial,
            digest: Digest::of(doc),
        })
    };
    let ctx = |fleet: &str, now, floor| VerifyContext {
        fleet: fleet.into(),
        now,
        floor,
        own_expiry: true,
    };
    #[rustfmt::skip]
    let rows: Vec<(&str, VerifyContext, &str)> = vec![
        ("fresh host", ctx("home", NOW, None), "ok"),
        ("wrong fleet", ctx("lab", NOW, None), "wrong_fleet"),
        ("expired", ctx("home", NOW + 3600, None), "expired"),
        ("clock in 1970, floor past expiry", ctx("home", NOW + 7200, None), "expired"),
        ("higher serial", ctx("home", NOW, accepted(4, b"x")), "ok"),
        ("same serial same bytes", ctx("home", NOW, accepted(5, &doc)), "ok"),
        ("same serial other bytes", ctx("home", NOW, accepted(5, b"other")), "serial_reused"),
        ("lower serial", ctx("home", NOW, accepted(6, b"x")), "serial_too_low"),
    ];
    for (what, context, expected) in rows {
        assert_eq!(
            code(verify(&doc, &sign(&doc, &[&k1]), &trust, &context)),
            expected,
            "{what}"
        );
    }
}

#[test]
fn malformed_documents_rows() {
    let k1 = key("ops1", 1);
    let trust = trust(&[&k1], 1);
    let good = String::from_utf8(document(5)).unwrap();
    let host_a = "\"a\": {";
    #[rustfmt::skip]
    let rows: Vec<(&str, String, &str)> = vec![
        ("not json", "hello".into(), "malformed"),
        ("empty", String::new(), "malformed"),
        ("unknown field", good.replacen("\"format\": 1,", "\"format\": 1, \"extra\": true,", 1), "malformed"),
        ("future format", good.replacen("\"format\": 1,", "\"format\": 2,", 1), "malformed"),
        ("duplicate host", good.replacen(host_a, &format!("\"a\": {{\"toplevel\": \"{TOPLEVEL}\"}}, {host_a}"), 1), "malformed"),
        ("not a store path", good.replace(TOPLEVEL, "/etc/passwd"), "malformed"),
        ("store path with slash", good.replace(TOPLEVEL, &format!("{TOPLEVEL}/bin")), "malformed"),
        ("store path bad hash", good.replace("a1ps8nbkrhi4", "e1ps8nbkrhi4"), "malformed"),
        ("store path traversal", good.replace(TOPLEVEL, "/nix/store/a1ps8nbkrhi4d52m2i2gzmv345rmsanm-../../etc"), "malformed"),
        ("bad host name", good.replacen(host_a, "\"-rf\": {", 1), "malformed"),
        ("bad fleet name", good.replacen("\"fleet\": \"home\"", "\"fleet\": \"ho me\"", 1), "malformed"),
        ("bad commit", good.replace("56697b0912ba35bff5f5d74e6c61a31052c3f1fc", "HEAD"), "malformed"),
        ("bad report key", good.replacen("\"report_key\": \"a:", "\"report_key\": \"a:x", 1), "malformed"),
        ("negative serial", good.replacen("\"serial\": 5", "\"serial\": -5", 1), "malformed"),
        ("rollout past its last wave", good.replacen("\"format\": 1,", "\"format\": 1, \"rollout\": {\"active\": 3, \"waves\": 3},", 1), "malformed"),
        ("rollout without waves", good.replacen("\"format\": 1,", "\"format\": 1, \"rollout\": {\"active\": 0, \"waves\": 0},", 1), "malformed"),
        ("rollout unknown field", good.replacen("\"format\": 1,", "\"format\": 1, \"rollout\": {\"active\": 0, \"waves\": 2, \"x\": 1},", 1), "malformed"),
        ("target not a store path", good.replacen(host_a, "\"a\": {\"target\": \"/etc/passwd\", ", 1), "malformed"),
    ];
    for (what, doc, expected) in rows {
        let doc = doc.into_bytes();
        assert_eq!(
            code(verify(&doc, &sign(&doc, &[&k1]), &trust, &context())),
            expected,
            "{what}"
        );
    }
    let huge = vec![b' '; MAX_DOCUMENT_BYTES + 1];
    assert_eq!(
        code(verify(&huge, &sign(&huge, &[&k1]), &trust, &context())),
        "too_large"
    );
}

#[test]
fn trust_policy_refuses_impossible_thresholds_and_twice_listed_keys() {
    let (k1, k2) = (key("ops1", 1), key("ops2", 2));
    assert!(TrustPolicy::new(vec![k1.public()], 0).is_err());
    assert!(TrustPolicy::new(vec![k1.public()], 2).is_err());
    assert!(TrustPolicy::new(vec![k1.public(), k1.public()], 2).is_err());
    let same_key_other_name = SecretKey::from_seed("ops1-copy", [1; 32]).unwrap();
    assert!(TrustPolicy::new(vec![k1.public(), same_key_other_name.public()], 2).is_err());
    assert!(TrustPolicy::new(vec![k1.public(), k2.public()], 2).is_ok());
}

#[test]
fn keys_round_trip_in_nix_format() {
    let k = key("cache.example.org-1", 7);
    let again = SecretKey::parse(&k.to_nix_string()).unwrap();
    assert_eq!(again.public(), k.public());
    assert_eq!(
        PublicKey::parse(&k.public().to_string()).unwrap(),
        k.public()
    );
    assert_eq!(
        format!("{k:?}"),
        "SecretKey(cache.example.org-1:<redacted>)"
    );
    assert_eq!(
        PublicKey::parse("nocolon").unwrap_err(),
        KeyError::MissingName
    );
    assert!(matches!(
        PublicKey::parse(&k.to_nix_string()).unwrap_err(),
        KeyError::BadLength { expected: 32, .. }
    ));
    assert!(matches!(
        SecretKey::parse(&k.public().to_string()).unwrap_err(),
        KeyError::BadLength { expected: 64, .. }
    ));
}

#[test]
fn error_wording() {
    let errors = [
        VerifyError::SerialTooLow {
            serial: 41,
            accepted: 42,
        }
        .to_string(),
        VerifyError::NotEnoughSignatures {
            valid: 1,
            threshold: 2,
            rejected: vec![
                ("ops2".into(), WHY_INVALID_FOR_TEST),
                ("evil".into(), "not a trusted key"),
            ],
            junk_lines: 1,
        }
        .to_string(),
        VerifyError::WrongFleet {
            expected: "home".into(),
            got: "lab".into(),
        }
        .to_string(),
    ];
    assert_eq!(
        errors,
        [
            "release serial 41 is older than accepted serial 42: refusing (a rollback must be a \
             new release with a higher serial)",
            "release has 1 valid signature(s) from trusted keys, 2 needed; not counted: ops2 \
             (signature does not match), evil (not a trusted key), 1 unreadable line(s)",
            "release is for fleet 'lab' but this host belongs to fleet 'home': refusing",
        ]
    );
}

const WHY_INVALID_FOR_TEST: &str = "signature does not match";

#[test]
fn verifies_ten_thousand_hosts() {
    let k1 = key("ops1", 1);
    let mut big = release(7);
    let entry = big.hosts["a"].clone();
    for i in 0..10_000 {
        big.hosts.insert(format!("host-{i:05}"), entry.clone());
    }
    let doc = serde_json::to_vec(&big).unwrap();
    let verified = verify(&doc, &sign(&doc, &[&k1]), &trust(&[&k1], 1), &context()).unwrap();
    assert_eq!(verified.release().hosts.len(), 10_001);
    // What an agent keeps: its own entry only, the rest of the fleet dropped.
    let digest = verified.digest();
    let kept = verified.clone().only_host("host-04711");
    assert_eq!(kept.release().hosts.len(), 1);
    assert_eq!(kept.digest(), digest);
    assert_eq!(kept.host("host-04711").unwrap().toplevel.as_str(), TOPLEVEL);
    assert_eq!(
        verified
            .only_host("nobody")
            .host("nobody")
            .unwrap_err()
            .code(),
        "no_host_entry"
    );
}

/// A freshness statement for `document` (serial `serial`), valid from `issued` to `expires`,
/// signed by `keys` over the freshness domain.
fn statement(
    document: &[u8],
    serial: u64,
    issued: u64,
    expires: u64,
    keys: &[&SecretKey],
) -> (Vec<u8>, Vec<u8>) {
    Statement::new("home", serial, Digest::of(document), issued, expires).sign(keys)
}

#[test]
fn freshness_rows() {
    let (k1, fresh_key) = (key("ops1", 1), key("fresh", 3));
    let keys = trust(&[&fresh_key], 1);
    let doc = document(5);
    let mut context = context();
    context.own_expiry = false;
    // Long expired by its own expiry: with freshness keys only the statement's counts.
    let mut old = release(5);
    old.issued_at = NOW - 100 * 86_400;
    old.expires = NOW - 60 * 86_400;
    let old_doc = serde_json::to_vec_pretty(&old).unwrap();
    let verified = verify(
        &old_doc,
        &sign(&old_doc, &[&k1]),
        &trust(&[&k1], 1),
        &context,
    )
    .expect("the release's own expiry does not count");
    let (s, g) = statement(&old_doc, 5, NOW - 60, NOW + 600, &[&fresh_key]);
    let fresh = verify_freshness(Some((&s, &g)), &keys, &verified, NOW).unwrap();
    assert_eq!((fresh.issued_at, fresh.expires), (NOW - 60, NOW + 600));
    assert!(!fresh.is_aging(NOW));
    assert!(fresh.is_aging(NOW + 270));

    let check = |(s, g): (Vec<u8>, Vec<u8>)| match verify_freshness(
        Some((&s, &g)),
        &keys,
        &verified,
        NOW,
    ) {
        Ok(_) => "ok",
        Err(e) => e.code(),
    };
    let other_release = document(4);
    let (s, g) = statement(&old_doc, 5, NOW - 60, NOW + 600, &[&fresh_key]);
    let mut tampered = s.clone();
    let at = tampered.len() - 5;
    tampered[at] = if tampered[at] == b'1' { b'2' } else { b'1' };
    type Signed = (Vec<u8>, Vec<u8>);
    let rows: Vec<(&str, Signed, &str)> = vec![
        ("valid", (s.clone(), g.clone()), "ok"),
        (
            "for another release's bytes",
            statement(&other_release, 5, NOW - 60, NOW + 600, &[&fresh_key]),
            "freshness_mismatch",
        ),
        (
            "for another serial",
            statement(&old_doc, 4, NOW - 60, NOW + 600, &[&fresh_key]),
            "freshness_mismatch",
        ),
        (
            "expired",
            statement(&old_doc, 5, NOW - 7200, NOW - 3600, &[&fresh_key]),
            "expired",
        ),
        (
            "signed by a release key",
            statement(&old_doc, 5, NOW - 60, NOW + 600, &[&k1]),
            "freshness_untrusted",
        ),
        (
            "a release signature over the statement (release domain)",
            (s.clone(), sign(&s, &[&fresh_key])),
            "freshness_untrusted",
        ),
        ("tampered", (tampered, g.clone()), "freshness_untrusted"),
        ("unsigned", (s.clone(), Vec::new()), "freshness_untrusted"),
        (
            "longer than 31 days",
            statement(&old_doc, 5, NOW - 60, NOW + 32 * 86_400, &[&fresh_key]),
            "freshness_invalid",
        ),
        (
            "unknown field",
            {
                let text = String::from_utf8(s.clone()).unwrap();
                let s = text
                    .replacen("\"format\": 1,", "\"format\": 1, \"toplevel\": \"x\",", 1)
                    .into_bytes();
                let g = SignatureFile::sign_message(&freshness_message(&s), &[&fresh_key])
                    .render()
                    .into_bytes();
                (s, g)
            },
            "freshness_invalid",
        ),
    ];
    for (what, pair, expected) in rows {
        assert_eq!(check(pair), expected, "{what}");
    }
    assert_eq!(
        verify_freshness(None, &keys, &verified, NOW)
            .unwrap_err()
            .code(),
        "freshness_missing"
    );
    // Another fleet's statement, even for the same bytes, is not this fleet's.
    let (lab, g) =
        Statement::new("lab", 5, Digest::of(&old_doc), NOW - 60, NOW + 600).sign(&[&fresh_key]);
    assert_eq!(
        verify_freshness(Some((&lab, &g)), &keys, &verified, NOW)
            .unwrap_err()
            .code(),
        "wrong_fleet"
    );
    // A freshness key cannot stand in for a release key: the release itself is refused.
    assert_eq!(
        code(verify(
            &doc,
            &sign(&doc, &[&fresh_key]),
            &trust(&[&k1], 1),
            &context
        )),
        "signature_untrusted"
    );
    // A freshness signature over a release document (the freshness domain) never counts as a
    // release signature, even by a release key.
    let cross = SignatureFile::sign_message(&freshness_message(&doc), &[&k1])
        .render()
        .into_bytes();
    assert_eq!(
        code(verify(&doc, &cross, &trust(&[&k1], 1), &context)),
        "signature_invalid"
    );
}

#[test]
fn an_expired_statement_says_how_long_ago() {
    let (k1, fresh_key) = (key("ops1", 1), key("fresh", 3));
    let doc = document(5);
    let verified = verify(&doc, &sign(&doc, &[&k1]), &trust(&[&k1], 1), &context()).unwrap();
    let (s, g) = statement(
        &doc,
        5,
        NOW - 10 * 86_400,
        NOW - 3 * 86_400 - 7200,
        &[&fresh_key],
    );
    let error =
        verify_freshness(Some((&s, &g)), &trust(&[&fresh_key], 1), &verified, NOW).unwrap_err();
    assert_eq!(error.code(), "expired");
    assert!(
        error.to_string().contains("expired at") && error.to_string().contains("3days 2h ago"),
        "{error}"
    );
}

/// A format-2 release of `hosts` entries (named host-0000…): its root document, pieces, list.
fn tree_release(serial: u64, hosts: usize) -> (Vec<u8>, HostFiles) {
    let mut release = release(serial);
    let entry = release.hosts["a"].clone();
    release.hosts = (0..hosts)
        .map(|i| (format!("host-{i:04}"), entry.clone()))
        .collect();
    let files = host_files("home", serial, &release.hosts);
    release.hosts.clear();
    release.format = FORMAT_TREE;
    release.host_tree = Some(files.tree.clone());
    (serde_json::to_vec_pretty(&release).unwrap(), files)
}

fn piece<'a>(files: &'a HostFiles, host: &str) -> &'a [u8] {
    let serial: HostPiece = serde_json::from_slice(&files.pieces[0].1).unwrap();
    let path = host_piece_path(serial.serial, host);
    &files.pieces.iter().find(|(p, _)| *p == path).unwrap().1
}

#[test]
fn format_two_proves_each_host_alone() {
    let k1 = key("ops1", 1);
    let (doc, files) = tree_release(7, 37);
    let verified = verify(&doc, &sign(&doc, &[&k1]), &trust(&[&k1], 1), &context()).unwrap();
    assert!(verified.has_host_tree());
    assert!(verified.release().hosts.is_empty());
    assert_eq!(files.pieces[5].0, "hosts/7/host-0005.json");
    // Each host's own piece proves its entry, and only its entry is kept.
    for i in [0, 5, 31, 36] {
        let host = format!("host-{i:04}");
        let mine = verified
            .clone()
            .with_host_piece(&host, Some(piece(&files, &host)))
            .unwrap();
        assert_eq!(mine.host(&host).unwrap().toplevel.as_str(), TOPLEVEL);
        assert_eq!(mine.release().hosts.len(), 1);
    }
    // No piece: authentic, with no entry for the host.
    let none = verified.clone().with_host_piece("host-0099", None).unwrap();
    assert_eq!(none.host("host-0099").unwrap_err().code(), "no_host_entry");

    let check = |host: &str, bytes: &[u8]| match verified.clone().with_host_piece(host, Some(bytes))
    {
        Ok(_) => "ok",
        Err(e) => e.code(),
    };
    let other_serial = tree_release(6, 37).1;
    let fewer = tree_release(7, 36).1;
    let text = |bytes: &[u8]| String::from_utf8(bytes.to_vec()).unwrap();
    let mine = text(piece(&files, "host-0005"));
    let reproved = |edit: &dyn Fn(&mut HostPiece)| {
        let mut p: HostPiece = serde_json::from_str(&mine).unwrap();
        edit(&mut p);
        serde_json::to_vec(&p).unwrap()
    };
    let rows: Vec<(&str, String, Vec<u8>, &str)> = vec![
        (
            "its own piece",
            "host-0005".into(),
            mine.clone().into_bytes(),
            "ok",
        ),
        (
            "another host's piece",
            "host-0005".into(),
            piece(&files, "host-0006").to_vec(),
            "host_proof_invalid",
        ),
        (
            "another host's piece renamed to this host",
            "host-0005".into(),
            {
                let mut p: HostPiece = serde_json::from_slice(piece(&files, "host-0006")).unwrap();
                p.host = "host-0005".into();
                serde_json::to_vec(&p).unwrap()
            },
            "host_proof_invalid",
        ),
        (
            "a stale piece (the release before)",
            "host-0005".into(),
            piece(&other_serial, "host-0005").to_vec(),
            "host_proof_invalid",
        ),
        (
            "a stale piece relabelled with this serial (mixed serials)",
            "host-0005".into(),
            {
                let mut p: HostPiece =
                    serde_json::from_slice(piece(&other_serial, "host-0005")).unwrap();
                p.serial = 7;
                serde_json::to_vec(&p).unwrap()
            },
            "host_proof_invalid",
        ),
        (
            "a piece from a tree of another size",
            "host-0005".into(),
            piece(&fewer, "host-0005").to_vec(),
            "host_proof_invalid",
        ),
        (
            "another toplevel with the same proof",
            "host-0005".into(),
            reproved(&|p| {
                p.entry.toplevel = StorePath::parse(
                    "/nix/store/b1ps8nbkrhi4d52m2i2gzmv345rmsanm-nixos-system-evil",
                )
                .unwrap()
            }),
            "host_proof_invalid",
        ),
        (
            "a wave added",
            "host-0005".into(),
            reproved(&|p| p.entry.wave = Some(9)),
            "host_proof_invalid",
        ),
        (
            "another index",
            "host-0005".into(),
            reproved(&|p| p.index = 6),
            "host_proof_invalid",
        ),
        (
            "a bent proof",
            "host-0005".into(),
            reproved(&|p| p.proof[0] = "00".repeat(32)),
            "host_proof_invalid",
        ),
        (
            "a proof hash that is not hex",
            "host-0005".into(),
            reproved(&|p| p.proof[0] = "zz".repeat(32)),
            "host_proof_invalid",
        ),
        (
            "an unknown field",
            "host-0005".into(),
            mine.replacen("{", "{\"activate\":true,", 1).into_bytes(),
            "host_proof_invalid",
        ),
        (
            "not a store path",
            "host-0005".into(),
            mine.replace(TOPLEVEL, "/etc/passwd").into_bytes(),
            "host_proof_invalid",
        ),
        (
            "oversized",
            "host-0005".into(),
            vec![b' '; MAX_HOST_PIECE_BYTES + 1],
            "host_proof_invalid",
        ),
    ];
    for (what, host, bytes, expected) in rows {
        assert_eq!(check(&host, &bytes), expected, "{what}");
    }

    // The full list, for the collector: the signed root's own, or refused.
    let all = verified.clone().with_all_hosts(Some(&files.list)).unwrap();
    assert_eq!(all.release().hosts.len(), 37);
    let list_code = |list: Option<&[u8]>| match verified.clone().with_all_hosts(list) {
        Ok(_) => "ok",
        Err(e) => e.code(),
    };
    assert_eq!(list_code(None), "host_list_invalid");
    assert_eq!(list_code(Some(&fewer.list)), "host_list_invalid");
    assert_eq!(list_code(Some(&other_serial.list)), "host_list_invalid");
    let mut list: HostList = serde_json::from_slice(&files.list).unwrap();
    list.hosts.get_mut("host-0003").unwrap().wave = Some(4);
    assert_eq!(
        list_code(Some(&serde_json::to_vec(&list).unwrap())),
        "host_list_invalid"
    );
}

#[test]
fn format_two_roots_are_validated() {
    let k1 = key("ops1", 1);
    let (doc, _) = tree_release(7, 3);
    let text = String::from_utf8(doc).unwrap();
    let resign = |t: String| {
        let d = t.into_bytes();
        code(verify(&d, &sign(&d, &[&k1]), &trust(&[&k1], 1), &context()))
    };
    assert_eq!(resign(text.clone()), "ok");
    assert_eq!(
        resign(text.replacen("\"format\": 2", "\"format\": 1", 1)),
        "malformed"
    );
    assert_eq!(
        resign(text.replacen("\"count\": 3", "\"count\": 0", 1)),
        "malformed"
    );
    assert_eq!(
        resign(text.replacen("\"format\": 2", "\"format\": 3", 1)),
        "malformed"
    );
    // Entries in the root beside a tree: refused, so two readers never disagree.
    let mut both: serde_json::Value = serde_json::from_str(&text).unwrap();
    both["hosts"] = serde_json::to_value(&release(7).hosts).unwrap();
    assert_eq!(resign(serde_json::to_string(&both).unwrap()), "malformed");
    // A format-1 document with a tree field: refused.
    let mut one: serde_json::Value = serde_json::to_value(release(7)).unwrap();
    one["host_tree"] = both["host_tree"].clone();
    assert_eq!(resign(serde_json::to_string(&one).unwrap()), "malformed");
}

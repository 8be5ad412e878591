//! HTTPS behind a private CA: the agent trusts the system's trust store plus `ca_file`; a
//! certificate from an unknown CA, for another name or expired is refused with `tls_untrusted`
//! before anything is asked of the server.

use crate::common::{Channel, Fleet};
use fleet_tests::http::TlsFileServer;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Self { cert, key }
    }

    /// A server certificate for `names` (an IP address or DNS name), PEM (cert, key);
    /// `expired` makes one whose validity ended in 2021.
    fn issue(&self, names: &[&str], expired: bool) -> (String, String) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

#[test]
fn an_https_channel_behind_a_private_ca_works_with_ca_file_and_bad_certificates_are_refused() {
    let mut fleet = Fleet::new(&["a"]);
    let host = fleet.host("a", Channel::Directory);
    let v1 = fleet.fleet.build("a");
    let v2 = fleet.release_change("a", |h| h.version = "2".into());
    let ca = Ca::new("fleet test CA");
    let ca_file = fleet.dir.join("ca.pem");
    std::fs::write(&ca_file, ca.cert.pem()).unwrap();
    let stranger = Ca::new("someone else's CA");
    let keys = [fleet.release_public_key()];

    let rows = [
        (
            "a certificate from an unknown CA",
            stranger.issue(&["127.0.0.1"], false),
            true,
            "UnknownIssuer",
        ),
        (
            "a certificate for another name",
            ca.issue(&["git.example.org"], false),
            true,
            "not valid for name",
        ),
        (
            "an expired certificate",
            ca.issue(&["127.0.0.1"], true),
            true,
            "Expired",
        ),
        (
            "no ca_file: the system does not know the CA",
            ca.issue(&["127.0.0.1"], false),
            false,
            "UnknownIssuer",
        ),
    ];
    for (i, (what, (cert, key), with_ca_file, says)) in rows.into_iter().enumerate() {
        let server = TlsFileServer::serve(
            &fleet.channel_dir,
            &cert,
            &key,
            &fleet.dir.join(format!("tls-{i}")),
        );
        let url = format!("https://127.0.0.1:{}", server.port);
        let top = if with_ca_file {
            format!("ca_file = \"{}\"", ca_file.display())
        } else {
            String::new()
        };
        host.write_config(&fleet.settings(&keys, 1, &url), &top, "");
        let (code, outcome) = host.once_outcome();
        assert_eq!(code, Some(1), "{what}: {outcome}");
        assert_eq!(outcome["code"], "tls_untrusted", "{what}: {outcome}");
        let message = outcome["message"].as_str().unwrap();
        assert!(
            message.to_lowercase().contains(&says.to_lowercase()),
            "{what}: {message}"
        );
        assert!(
            server.requests().is_empty(),
            "{what}: asked {:?}",
            server.requests()
        );
        host.assert_on(&v1);
    }

    // The server's certificate from the CA in ca_file, for the name in the URL: it works.
    let (cert, key) = ca.issue(&["127.0.0.1"], false);
    let server = TlsFileServer::serve(&fleet.channel_dir, &cert, &key, &fleet.dir.join("tls-good"));
    let url = format!("https://127.0.0.1:{}", server.port);
    host.write_config(
        &fleet.settings(&keys, 1, &url),
        &format!("ca_file = \"{}\"", ca_file.display()),
        "",
    );
    let (code, outcome) = host.once_outcome();
    assert_eq!(code, Some(0), "{outcome}");
    host.assert_on(&v2);
    assert!(
        server
            .requests()
            .iter()
            .any(|r| r.contains("GET /release.json")),
        "{:?}",
        server.requests()
    );

    // fleet-sign reads the same channel with the CA from $FLEET_CA_FILE (or ca_file in
    // fleet.toml), and refuses it without.
    let refused = fleet.verify(&url, &[]);
    assert_ne!(refused.code, Some(0), "{refused}");
    assert!(refused.stderr.contains("UnknownIssuer"), "{refused}");
    let mut c = fleet_tests::command("fleet-sign");
    c.args([
        "verify",
        "--from",
        &url,
        "--key",
        &fleet.release_public_key(),
    ])
    .env("FLEET_CA_FILE", &ca_file);
    let verified = fleet_tests::run(c);
    assert_eq!(verified.code, Some(0), "{verified}");
}

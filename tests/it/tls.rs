//! HTTPS behind a private CA: the agent trusts the system's trust store plus `ca_file`; a
//! certificate from an unknown CA, for another name or expired is refused with `tls_untrusted`
//! before anything is asked of the server.

use crate::common::{with_credentials, Channel, Fleet, S3Server, ACCESS_KEY, SECRET_KEY};
use fleet_tests::collector::Collector;
use fleet_tests::git::GitHttpServer;
use fleet_tests::http::{TlsFileServer, TlsProxy};
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

/// A server behind the TLS proxy: what it is, its port, its channel URL given the proxy's port.
type Backend = (&'static str, u16, fn(u16) -> String);

#[test]
fn git_over_https_an_s3_bucket_and_the_collector_behind_a_private_ca() {
    let mut fleet = Fleet::new(&["a"]);
    let v1 = fleet.fleet.build("a");
    // A machine of its own per row, installed with v1.
    let hosts: Vec<_> = ["a-git", "a-s3", "a-reporting"]
        .into_iter()
        .map(|dir| fleet.host_in("a", Channel::Directory, dir))
        .collect();
    let ca = Ca::new("fleet test CA");
    let ca_file = fleet.dir.join("ca.pem");
    std::fs::write(&ca_file, ca.cert.pem()).unwrap();
    let stranger = Ca::new("someone else's CA");
    let keys = [fleet.release_public_key()];
    let with_ca = format!("ca_file = \"{}\"\n", ca_file.display());

    // The release in the git remote and in an S3 bucket (published over plain HTTP: the
    // workstation is not under test here).
    let s3 = S3Server::start();
    fleet.fleet.set("a", |h| h.version = "2".into());
    fleet.fleet.commit("a: 2");
    let mut release = fleet_tests::command("fleet-sign");
    release
        .env("XDG_STATE_HOME", fleet.workstation_state())
        .args([
            "release",
            "--fleet",
            "home",
            "--flake",
            &fleet.fleet.flake_ref(),
        ])
        .arg("--cache")
        .arg(format!("file://{}", fleet.cache_dir.display()))
        .arg("--cache-key")
        .arg(&fleet.cache_key.secret)
        .args(["--substituter", &fleet.cache_server.url()])
        .args([
            "--channel",
            &fleet.git_channel(),
            "--channel",
            &s3.channel(),
            "--key",
        ])
        .arg(&fleet.release_key);
    fleet_tests::run(with_credentials(release)).ok();
    let v2 = fleet.fleet.build("a");
    let git = GitHttpServer::serve(&fleet.dir.join("remotes"), None);

    let backends: [Backend; 2] = [
        ("git over https", git.port(), |port| {
            format!("git+https://127.0.0.1:{port}/fleet.git")
        }),
        ("an S3 bucket over https", s3.port, |port| {
            format!("cache+s3://cache?region=us-east-1&endpoint=https://127.0.0.1:{port}")
        }),
    ];
    for (i, (what, backend, channel)) in backends.iter().enumerate() {
        let host = &hosts[i];
        host.set_env("AWS_ACCESS_KEY_ID", ACCESS_KEY);
        host.set_env("AWS_SECRET_ACCESS_KEY", SECRET_KEY);
        // A certificate from a CA the host does not know: refused before a byte reaches the
        // server behind the proxy.
        let (cert, key) = stranger.issue(&["127.0.0.1"], false);
        let proxy = TlsProxy::start(*backend, &cert, &key, &fleet.dir.join(format!("p{i}")));
        let url = channel(proxy.port);
        host.write_config(&fleet.settings(&keys, 1, &url), &with_ca, "");
        let (code, outcome) = host.once_outcome();
        assert_eq!(code, Some(1), "{what}: {outcome}");
        assert_eq!(outcome["code"], "tls_untrusted", "{what}: {outcome}");
        assert_eq!(proxy.forwarded(), 0, "{what}: {:?}", proxy.connections());
        host.assert_on(&v1);
        drop(proxy);

        // The server's certificate from the CA in ca_file: the host moves.
        let (cert, key) = ca.issue(&["127.0.0.1"], false);
        let proxy = TlsProxy::start(*backend, &cert, &key, &fleet.dir.join(format!("q{i}")));
        let url = channel(proxy.port);
        host.write_config(&fleet.settings(&keys, 1, &url), &with_ca, "");
        let (code, outcome) = host.once_outcome();
        assert_eq!(code, Some(0), "{what}: {outcome}");
        assert_eq!(outcome["outcome"], "committed", "{what}: {outcome}");
        assert!(proxy.forwarded() > 0, "{what}");
        host.assert_on(&v2);

        // fleet-sign reads the same channel with $FLEET_CA_FILE (git: a bundle of the system's
        // roots and the CA file for git's own HTTPS), and refuses it without.
        let verify = |ca: Option<&std::path::Path>| {
            let mut c = fleet_tests::command("fleet-sign");
            c.args(["verify", "--from", &url, "--key", &keys[0]]);
            if let Some(ca) = ca {
                c.env("FLEET_CA_FILE", ca);
            }
            fleet_tests::run(with_credentials(c))
        };
        let refused = verify(None);
        assert_ne!(refused.code, Some(0), "{what}: {refused}");
        let verified = verify(Some(&ca_file));
        assert_eq!(verified.code, Some(0), "{what}: {verified}");
    }

    // Reports over https: the collector behind the proxy, trusted through ca_file.
    let host = &hosts[2];
    let identity = fleet_tests::run(host.agent(&["identity"]))
        .ok()
        .stdout
        .trim()
        .to_owned();
    let config = fleet.dir.join("fleet.toml");
    std::fs::write(&config, format!("[hosts.a]\nreport_key = \"{identity}\"\n")).unwrap();
    fleet.fleet.set("a", |h| h.version = "3".into());
    fleet.fleet.commit("a: 3");
    fleet.release(&["--config", config.to_str().unwrap()]).ok();
    let collector = Collector::start(
        &fleet.dir.join("collector/fleet.db"),
        &fleet.channel_dir.display().to_string(),
        &fleet.release_public_key(),
    );
    let collector_port: u16 = collector.url.rsplit(':').next().unwrap().parse().unwrap();
    let (cert, key) = ca.issue(&["127.0.0.1"], false);
    let proxy = TlsProxy::start(
        collector_port,
        &cert,
        &key,
        &fleet.dir.join("collector-tls"),
    );
    let report = format!(
        "[report]\nurl = \"https://127.0.0.1:{}\"\ntimeout = \"2s\"\n",
        proxy.port
    );
    let directory = fleet.channel_url(Channel::Directory);
    host.write_config(&fleet.settings(&keys, 1, &directory), "", &report);
    let (code, outcome) = host.once_outcome();
    assert_eq!(code, Some(0), "{outcome}");
    // Without ca_file the report is not sent (and stays queued)...
    assert_eq!(collector.host("a")["report"], serde_json::Value::Null);
    assert_eq!(proxy.forwarded(), 0, "{:?}", proxy.connections());
    // ...with it, the queue reaches the collector.
    host.write_config(&fleet.settings(&keys, 1, &directory), &with_ca, &report);
    let (code, outcome) = host.once_outcome();
    assert_eq!(code, Some(0), "{outcome}");
    let a = collector.host("a");
    assert_eq!(
        a["report"]["last_good"],
        fleet.fleet.build("a").as_str(),
        "{a}"
    );
}

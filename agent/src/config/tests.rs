//! Config parsing and validation, including the wording of its errors.

use super::*;

const KEY: &str = "ops1:kQrJ0Q2bTIw7r8pQw3dKsyWyHc8M2oLPtY1r0Qy0mTE=";

fn parse(text: &str) -> Result<Config, String> {
    let raw: RawConfig = toml::from_str(text).map_err(|e| e.to_string())?;
    Config::from_raw(raw).map_err(|p| p.join("; "))
}

fn minimal(extra: &str) -> String {
    format!(
        "fleet = \"home\"\nhost = \"router1\"\ntrusted_keys = [\"{KEY}\"]\nchannel = \
         \"git+https://git.example.org/fleet.git\"\n{extra}"
    )
}

#[test]
fn minimal_config_gets_the_documented_defaults() {
    let config = parse(&minimal("")).unwrap();
    assert_eq!(config.poll_interval, Duration::from_secs(300));
    assert_eq!(config.realise, RealiseMode::Substitute);
    assert_eq!(config.max_attempts, 3);
    assert_eq!(config.trust.threshold(), 1);
    assert_eq!(
        config.channel,
        ChannelSpec::Git {
            url: "https://git.example.org/fleet.git".into(),
            refname: "fleet-release".into()
        }
    );
    assert_eq!(
        config.system_profile,
        Path::new("/nix/var/nix/profiles/system")
    );
    assert_eq!(config.current_system, Path::new("/run/current-system"));
    assert!(config.no_failed_units && config.channel_reachable);
}

#[test]
fn checks_of_every_type_parse() {
    let config = parse(&minimal(
        r#"
[health]
window = "2m"
[[health.checks]]
type = "unit"
unit = "sshd.service"
[[health.checks]]
type = "http"
url = "http://127.0.0.1:8080/health"
status = 204
required = false
[[health.checks]]
type = "tcp"
address = "127.0.0.1:22"
timeout = "3s"
[[health.checks]]
name = "db"
type = "command"
command = ["pg_isready"]
"#,
    ))
    .unwrap();
    let names: Vec<&str> = config.checks.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "unit sshd.service",
            "http http://127.0.0.1:8080/health",
            "tcp 127.0.0.1:22",
            "db"
        ]
    );
    assert!(!config.checks[1].required);
    assert_eq!(config.checks[2].timeout, Duration::from_secs(3));
    assert_eq!(config.health_window, Duration::from_secs(120));
}

#[test]
fn refusals_name_the_problem() {
    let rows = [
        ("unknown = 1", "unknown field `unknown`"),
        (
            "threshold = 2",
            "threshold 2 is impossible with 1 trusted keys",
        ),
        ("poll_interval = \"soon\"", "'soon' is not a duration"),
        ("max_attempts = 0", "max_attempts must be at least 1"),
        (
            "token_file = \"/nix/store/abc-token\"",
            "which every user can read",
        ),
        (
            "realise = \"build-always\"",
            "unknown variant `build-always`",
        ),
        (
            "[[health.checks]]\ntype = \"tcp\"\naddress = \"localhost\"",
            "address 'localhost' is not host:port",
        ),
        (
            "[[health.checks]]\ntype = \"unit\"",
            "type \"unit\" needs unit",
        ),
        (
            "[[health.checks]]\ntype = \"unit\"\nunit = \"a\"\nurl = \"http://x\"",
            "url does not apply",
        ),
        (
            "[[health.checks]]\ntype = \"tcp\"\naddress = \"h:1\"\nunit = \"x\"",
            "unit does not apply",
        ),
        (
            "[[health.checks]]\ntype = \"ping\"",
            "unknown variant `ping`",
        ),
        (
            "[paths]\nstate_dir = \"state\"",
            "paths.state_dir 'state' must be absolute",
        ),
    ];
    for (extra, needle) in rows {
        let error = parse(&minimal(extra)).unwrap_err();
        assert!(error.contains(needle), "{extra}: {error}");
    }
    let error =
        parse("fleet = \"home\"\nhost = \"h\"\ntrusted_keys = []\nchannel = \"relative/dir\"")
            .unwrap_err();
    assert_eq!(
        error,
        "trusted_keys is empty: list the release keys this host trusts; channel directory \
         'relative/dir' must be absolute"
    );
}

#[test]
fn physical_paths_follow_the_store_root() {
    let config = parse(&minimal("[paths]\nstore_root = \"/srv/h1/store\"")).unwrap();
    assert_eq!(
        config.physical("/nix/store/abc-system"),
        Path::new("/srv/h1/store/nix/store/abc-system")
    );
}

#[test]
fn reboot_windows_wrap_midnight_and_say_when_they_open() {
    use crate::config::DailyWindow;
    let day = 1_790_000_000 - 1_790_000_000 % 86_400;
    let at = |h: u64, m: u64| day + h * 3600 + m * 60;
    let night = DailyWindow::parse("02:00-04:30").unwrap();
    assert!(night.contains(at(2, 0)) && night.contains(at(4, 29)));
    assert!(!night.contains(at(4, 30)) && !night.contains(at(1, 59)));
    assert_eq!(night.next_open(at(1, 0)), at(2, 0));
    assert_eq!(night.next_open(at(3, 0)), at(26, 0));
    let wrapping = DailyWindow::parse("23:00-01:00").unwrap();
    assert!(wrapping.contains(at(23, 30)) && wrapping.contains(at(24, 30)));
    assert!(!wrapping.contains(at(12, 0)));
    assert_eq!(wrapping.next_open(at(12, 0)), at(23, 0));
    for bad in [
        "",
        "2-4",
        "24:00-01:00",
        "01:00-01:00",
        "01:60-02:00",
        "01:00",
    ] {
        assert!(DailyWindow::parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn sizes_take_binary_and_decimal_units() {
    assert_eq!(parse_size("512MiB"), Ok(512 << 20));
    assert_eq!(parse_size("512M"), Ok(512 << 20));
    assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
    assert_eq!(parse_size("2GB"), Ok(2_000_000_000));
    assert_eq!(parse_size("4096"), Ok(4096));
    assert!(parse_size("lots").is_err());
    assert!(parse_size("5 parsecs").unwrap_err().contains("parsecs"));
}

#[test]
fn freshness_keys_need_keys_of_their_own() {
    const FRESH: &str = "fresh:5SO5A/3oRhOc7Gu5S3hwoRPaJLNITTyEeM8zxnnkNbk=";
    let config = parse(&minimal(&format!("freshness_keys = [\"{FRESH}\"]"))).unwrap();
    let freshness = config.freshness.expect("freshness keys configured");
    assert_eq!(freshness.threshold(), 1);
    assert_eq!(freshness.keys()[0].name(), "fresh");
    assert!(parse(&minimal("")).unwrap().freshness.is_none());
    // The release key again, under another name: refused, whatever its name.
    let again = KEY.replacen("ops1", "fresh", 1);
    let error = parse(&minimal(&format!("freshness_keys = [\"{again}\"]"))).unwrap_err();
    assert_eq!(
        error,
        "freshness key 'fresh' is also a release key (trusted_keys): the freshness role needs a \
         key of its own"
    );
}

#[test]
fn cache_channels_name_the_store_and_where_the_release_lies() {
    let cache = |text: &str| match ChannelSpec::parse(text) {
        Ok(ChannelSpec::Cache(cache)) => Ok((cache.store, cache.location)),
        Ok(other) => panic!("{text} parsed as {other:?}"),
        Err(e) => Err(e),
    };
    assert_eq!(
        cache("cache+file:///srv/cache/").unwrap(),
        (
            "file:///srv/cache".into(),
            CacheLocation::Directory("/srv/cache/fleet".into())
        )
    );
    assert_eq!(
        cache("cache+https://cache.example.org/nix").unwrap(),
        (
            "https://cache.example.org/nix".into(),
            CacheLocation::Http("https://cache.example.org/nix/fleet".into())
        )
    );
    #[cfg(feature = "s3")]
    {
        // Nix's S3 syntax: an endpoint as host:port with a scheme, or as a URL; profile ignored.
        let s3 = |endpoint: Option<&str>, region: Option<&str>| {
            CacheLocation::S3(S3Location {
                bucket: "fleet-cache".into(),
                region: region.map(str::to_owned),
                endpoint: endpoint.map(str::to_owned),
            })
        };
        let store =
            "s3://fleet-cache?region=eu-west-1&endpoint=minio.lan:9000&scheme=http&profile=p";
        assert_eq!(
            cache(&format!("cache+{store}")).unwrap(),
            (
                store.into(),
                s3(Some("http://minio.lan:9000"), Some("eu-west-1"))
            )
        );
        assert_eq!(
            cache("cache+s3://fleet-cache?endpoint=https://s3.lan/")
                .unwrap()
                .1,
            s3(Some("https://s3.lan"), None)
        );
        assert_eq!(cache("cache+s3://fleet-cache").unwrap().1, s3(None, None));
        let shown = ChannelSpec::parse("cache+s3://fleet-cache?region=x").unwrap();
        assert_eq!(shown.to_string(), "cache+s3://fleet-cache?region=x");
    }
    // An agent built without the s3 feature refuses the channel, saying so.
    #[cfg(not(feature = "s3"))]
    assert!(cache("cache+s3://fleet-cache")
        .unwrap_err()
        .contains("built without S3 support"));
    for (bad, why) in [
        ("cache+s3://", "name a bucket"),
        ("cache+s3://b/sub", "name a bucket"),
        ("cache+s3://b?scheme=ftp", "neither http nor https"),
        ("cache+file://relative", "absolute path"),
        ("cache+ssh://host", "use cache+file"),
    ] {
        let e = cache(bad).unwrap_err();
        assert!(e.contains(why), "{bad}: {e}");
    }
}

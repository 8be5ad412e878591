//! `fleet-sign collect`: the collector. Hosts POST signed reports to it; `fleet-sign status` and
//! Prometheus read the fleet from it.

use super::verify::trust_policy;
use crate::channel::Channel;
use crate::collect::db::Db;
use crate::collect::{server, Collector};
use crate::config::Loaded;
use anyhow::{Context as _, Result};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Receive signed host reports, keep the latest per host, serve the fleet view and metrics.
#[derive(clap::Args)]
pub struct Args {
    /// Address to listen on (default: [collector] listen from the config, else
    /// 127.0.0.1:9400).
    #[arg(long)]
    listen: Option<String>,
    /// The SQLite database (default: [collector] database from the config, else
    /// ./fleet-collector.db).
    #[arg(long)]
    database: Option<PathBuf>,
    /// The release channel the host keys come from (default: [collector] channel, else the
    /// first of channels from the config).
    #[arg(long)]
    from: Option<String>,
    /// A trusted release key, inline or a file; repeat for several (default: from the config).
    #[arg(long = "key")]
    keys: Vec<String>,
    /// How many trusted keys must have signed (default: from the config, else 1).
    #[arg(long)]
    threshold: Option<usize>,
    /// A freshness key hosts trust, inline or a file; repeat for several (default: [freshness]
    /// keys from the config). The fleet view and metrics then show when the release's
    /// freshness statement expires.
    #[arg(long = "freshness-key")]
    freshness_keys: Vec<String>,
    /// The fleet (default: from the config).
    #[arg(long)]
    fleet: Option<String>,
    /// How often to look for a newer release.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    refresh: Duration,
    /// Reports kept per host besides the latest.
    #[arg(long, default_value_t = 100)]
    history: usize,
    /// Threads serving requests.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Config file (default: ./fleet.toml if present).
    #[arg(long)]
    config: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<()> {
    let config = Loaded::load(args.config.as_deref())?;
    let section = config.raw.collector.clone().unwrap_or_default();
    let trust = trust_policy(&args.keys, args.threshold, &config)?;
    let fleet = args
        .fleet
        .or(config.raw.fleet.clone())
        .ok_or_else(|| crate::usage("no fleet: give --fleet or set fleet in fleet.toml"))?;
    let channel = match (
        &args.from,
        section.channel.as_ref().or(config.raw.channels.first()),
    ) {
        (Some(from), _) => crate::config::parse_channel(from)?,
        (None, Some(text)) => config.channel(text)?,
        (None, None) => {
            return Err(crate::usage(
                "no channel to read host keys from: give --from or set channels",
            ))
        }
    };
    let database = args
        .database
        .or(section.database.map(|p| config.resolve(&p)))
        .unwrap_or_else(|| PathBuf::from("fleet-collector.db"));
    let listen = args
        .listen
        .or(section.listen)
        .unwrap_or_else(|| "127.0.0.1:9400".into());

    let db = Db::open(&database, args.history)?;
    let collector = Arc::new(Collector::new(
        fleet,
        trust,
        super::verify::freshness_policy(&args.freshness_keys, &config)?,
        db,
    )?);
    let server = tiny_http::Server::http(&listen)
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    let address = server
        .server_addr()
        .to_ip()
        .map_or(listen.clone(), |a| a.to_string());
    refresh(&collector, &channel);
    {
        let collector = collector.clone();
        std::thread::spawn(move || loop {
            std::thread::sleep(args.refresh);
            refresh(&collector, &channel);
        });
    }
    log::info!(
        "collecting reports for fleet {} on http://{address} into {}",
        collector.fleet(),
        database.display()
    );
    // The first line on stdout says where it listens (tests and scripts read it).
    println!("listening on http://{address}");
    use std::io::Write as _;
    std::io::stdout().flush().context("stdout")?;
    server::serve(Arc::new(server), collector, args.workers);
    Ok(())
}

/// Reads the channel and adopts a newer release; keeps the known one on any failure.
fn refresh(collector: &Collector, channel: &Channel) {
    let read = match collector.uses_freshness() {
        true => channel.read_with_freshness(),
        false => channel.read(),
    };
    match read {
        Ok(Some(published)) => {
            let stored = crate::collect::db::StoredRelease {
                document: published.document.clone(),
                signatures: published.signatures.clone(),
                hosts: published.hosts.clone(),
            };
            if let Err(e) = collector.adopt(&stored) {
                log::warn!(code = e.code(); "the release in {channel} is refused, keeping the one known: {e}");
            }
            if let Err(e) = collector.check_freshness(published.freshness(), super::now()) {
                log::warn!(code = e.code(); "hosts refuse the release in {channel}: {e}");
            }
        }
        Ok(None) => log::warn!("{channel} holds no release yet"),
        Err(e) => log::warn!("cannot read {channel}: {e:#}"),
    }
}

//! The collector's database: SQLite in WAL mode with full sync, so a report the collector
//! answered 200 to survives a kill -9 and a power cut.
//!
//! ```sql
//! hosts    (host PRIMARY KEY, key, counter, received_at, peer, report)   -- the latest per host
//! history  (id, host, counter, received_at, report)                      -- the last N per host
//! release  (id = 1, document, signatures)                                -- the newest verified
//! ```
//!
//! The replay check and the write happen in one transaction under the one connection's lock, so
//! two copies of a report racing in can never both be accepted.

use anyhow::{Context as _, Result};
use rusqlite::{params, Connection, OptionalExtension as _, TransactionBehavior};
use std::path::Path;

/// How a report fared against what the database holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Stored {
    Accepted,
    /// The counter is not above the last one accepted for this host and key.
    Replay {
        last: u64,
    },
}

/// A host's latest report as stored.
#[derive(Debug, Clone)]
pub struct Latest {
    pub host: String,
    pub received_at: u64,
    pub peer: String,
    pub report: String,
}

pub struct Db {
    connection: Connection,
    history: usize,
}

impl Db {
    pub fn open(path: &Path, history: usize) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("could not create {}", dir.display()))?;
        }
        let connection = Connection::open(path)
            .with_context(|| format!("could not open the database {}", path.display()))?;
        connection
            .pragma_update(None, "journal_mode", "WAL")
            .and_then(|()| connection.pragma_update(None, "synchronous", "FULL"))
            .and_then(|()| connection.busy_timeout(std::time::Duration::from_secs(5)))
            .and_then(|()| {
                connection.execute_batch(
                    "CREATE TABLE IF NOT EXISTS hosts (
                        host TEXT PRIMARY KEY,
                        key TEXT NOT NULL,
                        counter INTEGER NOT NULL,
                        received_at INTEGER NOT NULL,
                        peer TEXT NOT NULL,
                        report TEXT NOT NULL
                    );
                    CREATE TABLE IF NOT EXISTS history (
                        id INTEGER PRIMARY KEY,
                        host TEXT NOT NULL,
                        counter INTEGER NOT NULL,
                        received_at INTEGER NOT NULL,
                        report TEXT NOT NULL
                    );
                    CREATE INDEX IF NOT EXISTS history_by_host ON history (host, id);
                    CREATE TABLE IF NOT EXISTS release (
                        id INTEGER PRIMARY KEY CHECK (id = 1),
                        document BLOB NOT NULL,
                        signatures BLOB NOT NULL
                    );
                    CREATE TABLE IF NOT EXISTS release_hosts (
                        id INTEGER PRIMARY KEY CHECK (id = 1),
                        list BLOB NOT NULL
                    );",
                )
            })
            .with_context(|| format!("could not set up the database {}", path.display()))?;
        Ok(Self {
            connection,
            history,
        })
    }

    /// Stores a verified report unless it is a replay. `key` is the key it was verified with: a
    /// host with a new key (a reinstalled host) starts its counters over.
    pub fn store(
        &mut self,
        host: &str,
        key: &str,
        counter: u64,
        received_at: u64,
        peer: &str,
        report: &str,
    ) -> Result<Stored> {
        let counter_sql = i64::try_from(counter).context("counter out of range")?;
        let tx = self
            .connection
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let last: Option<(String, i64)> = tx
            .query_row(
                "SELECT key, counter FROM hosts WHERE host = ?1",
                params![host],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()?;
        if let Some((last_key, last)) = last {
            if last_key == key && last >= counter_sql {
                return Ok(Stored::Replay { last: last as u64 });
            }
        }
        tx.execute(
            "INSERT INTO hosts (host, key, counter, received_at, peer, report)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (host) DO UPDATE SET key = ?2, counter = ?3, received_at = ?4,
                 peer = ?5, report = ?6",
            params![host, key, counter_sql, received_at as i64, peer, report],
        )?;
        tx.execute(
            "INSERT INTO history (host, counter, received_at, report) VALUES (?1, ?2, ?3, ?4)",
            params![host, counter_sql, received_at as i64, report],
        )?;
        tx.execute(
            "DELETE FROM history WHERE host = ?1 AND id NOT IN
                (SELECT id FROM history WHERE host = ?1 ORDER BY id DESC LIMIT ?2)",
            params![host, self.history as i64],
        )?;
        tx.commit()?;
        Ok(Stored::Accepted)
    }

    /// Every host's latest report.
    pub fn latest(&self) -> Result<Vec<Latest>> {
        let mut statement = self
            .connection
            .prepare_cached("SELECT host, received_at, peer, report FROM hosts ORDER BY host")?;
        let rows = statement.query_map([], |row| {
            Ok(Latest {
                host: row.get(0)?,
                received_at: row.get::<_, i64>(1)? as u64,
                peer: row.get(2)?,
                report: row.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// A host's stored history, oldest first: (counter, received_at, report).
    pub fn history(&self, host: &str) -> Result<Vec<(u64, u64, String)>> {
        let mut statement = self.connection.prepare_cached(
            "SELECT counter, received_at, report FROM history WHERE host = ?1 ORDER BY id",
        )?;
        let rows = statement.query_map(params![host], |row| {
            Ok((
                row.get::<_, i64>(0)? as u64,
                row.get::<_, i64>(1)? as u64,
                row.get(2)?,
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The newest verified release the collector knows, if any.
    /// The release stored: document, signatures and a format-2 release's `hosts.json`.
    pub fn release(&self) -> Result<Option<StoredRelease>> {
        let stored: Option<(Vec<u8>, Vec<u8>)> = self
            .connection
            .query_row(
                "SELECT document, signatures FROM release WHERE id = 1",
                [],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()?;
        let Some((document, signatures)) = stored else {
            return Ok(None);
        };
        let hosts = self
            .connection
            .query_row("SELECT list FROM release_hosts WHERE id = 1", [], |row| {
                row.get(0)
            })
            .optional()?;
        Ok(Some(StoredRelease {
            document,
            signatures,
            hosts,
        }))
    }

    pub fn set_release(&mut self, release: &StoredRelease) -> Result<()> {
        let tx = self.connection.transaction()?;
        tx.execute(
            "INSERT INTO release (id, document, signatures) VALUES (1, ?1, ?2)
             ON CONFLICT (id) DO UPDATE SET document = ?1, signatures = ?2",
            params![release.document, release.signatures],
        )?;
        match &release.hosts {
            Some(list) => tx.execute(
                "INSERT INTO release_hosts (id, list) VALUES (1, ?1)
                 ON CONFLICT (id) DO UPDATE SET list = ?1",
                params![list],
            )?,
            None => tx.execute("DELETE FROM release_hosts", [])?,
        };
        tx.commit()?;
        Ok(())
    }
}

/// A release as the collector stores it.
#[derive(Debug, Clone)]
pub struct StoredRelease {
    pub document: Vec<u8>,
    pub signatures: Vec<u8>,
    pub hosts: Option<Vec<u8>>,
}

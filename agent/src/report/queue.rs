//! The on-disk report queue: signed reports wait here until the collector took them.
//!
//! ```text
//! <state_dir>/reports/counter                  a counter no report has reached yet
//! <state_dir>/reports/00001790000000000001     one signed report: signature line, then body
//! ```
//!
//! Every file is written whole (temporary file, fsync, rename, fsync of the directory), so a
//! power cut leaves each report either queued or not, never half. Counters rise across restarts:
//! the next one is above every queued report, the counter file and the current time in
//! microseconds, so even a state directory restored from a backup, or a clock that went back
//! (a Pi without a battery-backed clock), does not reuse old counters. The counter file is a
//! reservation: every counter given out is at most the one it holds, and it is moved
//! [`RESERVATION`] ahead when a counter would pass it, so it is written about once a month and
//! at each start, not per report: a report sent straight from memory (a heartbeat) writes
//! nothing to disk. The queue holds at most
//! `limit` reports; when full, the oldest goes, since every report carries the host's whole state
//! and the newest always wins.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The queue's directory in the state directory.
pub const QUEUE_DIR: &str = "reports";
const COUNTER_FILE: &str = "counter";
/// How far ahead of the counter in use the counter file reserves: 30 days of microseconds.
pub const RESERVATION: u64 = 30 * 24 * 3600 * 1_000_000;

/// A queued report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    pub counter: u64,
    pub signature: String,
    pub body: Vec<u8>,
}

#[derive(Debug)]
pub struct Queue {
    dir: PathBuf,
    limit: usize,
    /// The highest counter given out by this process.
    last: AtomicU64,
    /// The reservation this process wrote to the counter file (0: none yet).
    reserved: AtomicU64,
}

impl Queue {
    pub fn new(state_dir: &Path, limit: usize) -> Self {
        Self {
            dir: state_dir.join(QUEUE_DIR),
            limit: limit.max(1),
            last: AtomicU64::new(0),
            reserved: AtomicU64::new(0),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The next counter, within the reservation on disk (moved ahead first when needed).
    pub fn next_counter(&self) -> std::io::Result<u64> {
        let reserved = self.reserved.load(Ordering::SeqCst);
        let floor = if reserved == 0 {
            // First counter of this process: above everything any earlier one may have used.
            let recorded = std::fs::read_to_string(self.dir.join(COUNTER_FILE))
                .ok()
                .and_then(|text| text.trim().parse::<u64>().ok())
                .unwrap_or(0);
            let queued = self.counters()?.last().copied().unwrap_or(0);
            recorded.max(queued)
        } else {
            0
        };
        let micros = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros().min(u64::MAX as u128) as u64);
        let last = self.last.load(Ordering::SeqCst).max(floor);
        let next = last.saturating_add(1).max(micros);
        if next > reserved {
            let reservation = next.saturating_add(RESERVATION);
            std::fs::create_dir_all(&self.dir)?;
            self.write_atomically(COUNTER_FILE, format!("{reservation}\n").as_bytes())?;
            self.reserved.store(reservation, Ordering::SeqCst);
        }
        self.last.fetch_max(next, Ordering::SeqCst);
        Ok(next)
    }

    /// Queues a signed report, dropping the oldest beyond the limit.
    pub fn push(&self, counter: u64, signature: &str, body: &[u8]) -> std::io::Result<()> {
        let mut bytes = Vec::with_capacity(signature.len() + 1 + body.len());
        bytes.extend_from_slice(signature.as_bytes());
        bytes.push(b'\n');
        bytes.extend_from_slice(body);
        self.write_atomically(&format!("{counter:020}"), &bytes)?;
        let counters = self.counters()?;
        for old in &counters[..counters.len().saturating_sub(self.limit)] {
            log::warn!(
                "report queue is full ({} reports): dropping report {old}, the oldest",
                self.limit
            );
            let _ = std::fs::remove_file(self.dir.join(format!("{old:020}")));
        }
        Ok(())
    }

    /// The queued reports' counters, oldest first.
    pub fn counters(&self) -> std::io::Result<Vec<u64>> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut counters: Vec<u64> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name();
                let name = name.to_str()?;
                (name.len() == 20).then(|| name.parse().ok())?
            })
            .collect();
        counters.sort_unstable();
        Ok(counters)
    }

    /// The oldest queued report. A file that does not parse is removed (and logged).
    pub fn oldest(&self) -> std::io::Result<Option<Queued>> {
        for counter in self.counters()? {
            let path = self.dir.join(format!("{counter:020}"));
            let bytes = match std::fs::read(&path) {
                Ok(bytes) => bytes,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let split = bytes.iter().position(|b| *b == b'\n');
            match split.and_then(|i| Some((std::str::from_utf8(&bytes[..i]).ok()?, i))) {
                Some((signature, i)) => {
                    return Ok(Some(Queued {
                        counter,
                        signature: signature.to_owned(),
                        body: bytes[i + 1..].to_vec(),
                    }))
                }
                None => {
                    log::warn!("dropping unreadable queued report {}", path.display());
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        Ok(None)
    }

    /// Removes a report the collector took (or refused for good). Its counter is below the
    /// reservation on disk.
    pub fn remove(&self, counter: u64) -> std::io::Result<()> {
        match std::fs::remove_file(self.dir.join(format!("{counter:020}"))) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    fn write_atomically(&self, name: &str, bytes: &[u8]) -> std::io::Result<()> {
        crate::durable::write(&self.dir.join(name), bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_rise_across_reopening_and_emptying() {
        let dir = tempfile::tempdir().unwrap();
        let queue = Queue::new(dir.path(), 8);
        let a = queue.next_counter().unwrap();
        queue.push(a, "h:sig", b"{}").unwrap();
        queue.remove(a).unwrap();
        // The counter file holds a reservation ahead of it, written once for many counters.
        let reservation = || -> u64 {
            std::fs::read_to_string(queue.dir().join(COUNTER_FILE))
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        };
        assert_eq!(reservation(), a + RESERVATION);
        let more: Vec<u64> = (0..100).map(|_| queue.next_counter().unwrap()).collect();
        assert!(more.windows(2).all(|w| w[0] < w[1]) && more[0] > a);
        assert_eq!(reservation(), a + RESERVATION, "not rewritten per counter");
        // A new process starts above the reservation, whatever its clock says.
        let b = Queue::new(dir.path(), 8).next_counter().unwrap();
        assert!(b > a + RESERVATION);
        // A queued report keeps the floor, also for a new process.
        queue.push(u64::MAX - 10, "h:sig", b"{}").unwrap();
        assert_eq!(
            Queue::new(dir.path(), 8).next_counter().unwrap(),
            u64::MAX - 9
        );
        // Its reservation in the counter file does too, once the queue is empty.
        queue.remove(u64::MAX - 10).unwrap();
        assert!(Queue::new(dir.path(), 8).next_counter().unwrap() > u64::MAX - 9);
    }

    #[test]
    fn keeps_order_and_drops_the_oldest_beyond_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let queue = Queue::new(dir.path(), 3);
        for counter in [5, 1, 9, 7] {
            queue
                .push(counter, "h:sig", format!("{{\"n\":{counter}}}").as_bytes())
                .unwrap();
        }
        assert_eq!(queue.counters().unwrap(), vec![5, 7, 9]);
        let oldest = queue.oldest().unwrap().unwrap();
        assert_eq!(oldest.counter, 5);
        assert_eq!(oldest.signature, "h:sig");
        assert_eq!(oldest.body, b"{\"n\":5}");
        queue.remove(5).unwrap();
        assert_eq!(queue.oldest().unwrap().unwrap().counter, 7);
    }
}

//! Logging: to the journal with structured fields when stderr is connected to journald (as
//! under systemd), to stderr otherwise.
//!
//! Key-value pairs on a record (`phase`, `serial`, `store_path`, `code`, …) become journal
//! fields (`PHASE=`, `SERIAL=`, …), so `journalctl -u fleet-agent -o json` can be filtered by
//! them; on stderr they follow the message in brackets.

use log::{Level, LevelFilter, Log, Metadata, Record};
use std::io::Write as _;

struct StderrLogger {
    level: LevelFilter,
    program: &'static str,
}

struct Fields(String);

impl<'kvs> log::kv::VisitSource<'kvs> for Fields {
    fn visit_pair(
        &mut self,
        key: log::kv::Key<'kvs>,
        value: log::kv::Value<'kvs>,
    ) -> Result<(), log::kv::Error> {
        let value = value.to_string();
        if !value.is_empty() {
            if !self.0.is_empty() {
                self.0.push(' ');
            }
            self.0 += &format!("{key}={value}");
        }
        Ok(())
    }
}

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let mut fields = Fields(String::new());
        let _ = record.key_values().visit(&mut fields);
        let level = match record.level() {
            Level::Error => "error",
            Level::Warn => "warning",
            Level::Info => "info",
            Level::Debug => "debug",
            Level::Trace => "trace",
        };
        let suffix = if fields.0.is_empty() {
            String::new()
        } else {
            format!(" [{}]", fields.0)
        };
        let _ = writeln!(
            std::io::stderr().lock(),
            "{}: {level}: {}{suffix}",
            self.program,
            record.args()
        );
    }

    fn flush(&self) {}
}

/// Sets up logging once for `program` (its name in the journal and on stderr); `verbose` adds
/// debug lines (every command run).
pub fn init(program: &'static str, verbose: bool) {
    let level = if verbose {
        LevelFilter::Debug
    } else {
        LevelFilter::Info
    };
    if systemd_journal_logger::connected_to_journal() {
        if let Ok(logger) = systemd_journal_logger::JournalLog::new() {
            let logger = logger.with_syslog_identifier(program.into());
            if logger.install().is_ok() {
                log::set_max_level(level);
                return;
            }
        }
    }
    if log::set_boxed_logger(Box::new(StderrLogger { level, program })).is_ok() {
        log::set_max_level(level);
    }
}

//! Progress of the long Nix steps (`nix build`, `nix copy`), read from Nix's own structured log
//! (`--log-format internal-json`: one `@nix {…}` line per event on stderr).
//!
//! On a terminal one status line is redrawn (derivations built and running, paths fetched and
//! copied, bytes); elsewhere (CI logs) a plain line per step. Nix's messages and the last lines
//! of a failing build's log are kept for the error, which is what an operator needs when a
//! step fails after minutes of silence.

use std::collections::{HashMap, VecDeque};
use std::io::{IsTerminal as _, Write as _};
use std::time::{Duration, Instant};

/// Log lines kept per build, for the error of one that fails.
const LOG_TAIL: usize = 12;
/// Least time between two redraws of the status line.
const REDRAW: Duration = Duration::from_millis(200);

// Nix's activity and result types (src/libutil/logging.hh), stable since Nix 2.0.
const ACT_COPY_PATH: u64 = 100;
const ACT_BUILDS: u64 = 104;
const ACT_BUILD: u64 = 105;
const ACT_SUBSTITUTE: u64 = 108;
const RES_BUILD_LOG_LINE: u64 = 101;
const RES_PROGRESS: u64 = 105;

/// One Nix command's progress, fed its stderr line by line.
pub struct NixProgress {
    terminal: bool,
    activities: HashMap<u64, Activity>,
    /// The activity counting every build (`[done, expected, running, failed]`).
    builds: Option<u64>,
    /// Builds failed as Nix counts them, and as stopped builds were judged so far: Nix counts
    /// a failure before it stops the build's activity.
    failed_counted: u64,
    failed_seen: u64,
    built: usize,
    fetched: usize,
    copied: usize,
    bytes: u64,
    /// Nix's messages (errors, warnings) and any line that is not a structured event.
    messages: Vec<String>,
    /// Builds' last log lines, by derivation path, kept after they stop.
    logs: HashMap<String, VecDeque<String>>,
    drawn: Option<Instant>,
}

struct Activity {
    kind: u64,
    /// The derivation or store path it is about.
    path: String,
    /// Bytes done so far (copies, downloads).
    done: u64,
}

#[derive(serde::Deserialize)]
struct Event {
    action: String,
    #[serde(default)]
    id: u64,
    #[serde(default, rename = "type")]
    kind: u64,
    #[serde(default)]
    fields: Vec<serde_json::Value>,
    #[serde(default)]
    level: u64,
    #[serde(default)]
    msg: Option<String>,
}

impl Default for NixProgress {
    fn default() -> Self {
        Self::new()
    }
}

impl NixProgress {
    pub fn new() -> Self {
        Self {
            terminal: std::io::stderr().is_terminal(),
            activities: HashMap::new(),
            builds: None,
            failed_counted: 0,
            failed_seen: 0,
            built: 0,
            fetched: 0,
            copied: 0,
            bytes: 0,
            messages: Vec::new(),
            logs: HashMap::new(),
            drawn: None,
        }
    }

    /// Takes one line of the command's stderr.
    pub fn line(&mut self, line: &str) {
        let Some(event) = line
            .strip_prefix("@nix ")
            .and_then(|json| serde_json::from_str::<Event>(json).ok())
        else {
            if !line.trim().is_empty() {
                self.messages.push(line.to_owned());
            }
            return;
        };
        let text = |i: usize| {
            event
                .fields
                .get(i)
                .and_then(|f| f.as_str())
                .unwrap_or_default()
                .to_owned()
        };
        match event.action.as_str() {
            "msg" if event.level <= 1 => {
                if let Some(msg) = &event.msg {
                    self.messages.push(strip_ansi(msg));
                }
            }
            "start" if event.kind == ACT_BUILDS => self.builds = Some(event.id),
            "result" if event.kind == RES_PROGRESS && self.builds == Some(event.id) => {
                self.failed_counted = event.fields.get(3).and_then(|f| f.as_u64()).unwrap_or(0);
            }
            "start" if matches!(event.kind, ACT_BUILD | ACT_COPY_PATH | ACT_SUBSTITUTE) => {
                let path = text(0);
                if event.kind == ACT_BUILD {
                    self.step(&format!("building {}", name(&path)));
                }
                self.activities.insert(
                    event.id,
                    Activity {
                        kind: event.kind,
                        path,
                        done: 0,
                    },
                );
            }
            "result" if event.kind == RES_BUILD_LOG_LINE => {
                if let Some(activity) = self.activities.get(&event.id) {
                    let log = self.logs.entry(activity.path.clone()).or_default();
                    if log.len() == LOG_TAIL {
                        log.pop_front();
                    }
                    log.push_back(strip_ansi(&text(0)));
                }
            }
            "result" if event.kind == RES_PROGRESS => {
                if let Some(activity) = self.activities.get_mut(&event.id) {
                    activity.done = event.fields.first().and_then(|f| f.as_u64()).unwrap_or(0);
                }
            }
            "stop" => {
                if let Some(activity) = self.activities.remove(&event.id) {
                    let what = name(&activity.path);
                    match activity.kind {
                        ACT_BUILD if self.failed_counted > self.failed_seen => {
                            self.failed_seen += 1;
                            self.step(&format!("failed to build {what}"));
                        }
                        ACT_BUILD => {
                            self.built += 1;
                            self.step(&format!("built {what}"));
                        }
                        ACT_SUBSTITUTE => {
                            self.fetched += 1;
                            self.step(&format!("fetched {what}"));
                        }
                        _ => {
                            self.copied += 1;
                            self.bytes += activity.done;
                            let size = match activity.done {
                                0 => String::new(),
                                n => format!(" ({})", human_size(n)),
                            };
                            self.step(&format!("copied {what}{size}"));
                        }
                    }
                }
            }
            _ => {}
        }
        self.redraw(false);
    }

    /// One step done: its own line when not on a terminal.
    fn step(&self, what: &str) {
        if !self.terminal {
            eprintln!("  {what}");
        }
    }

    /// The status line, on a terminal, at most every [`REDRAW`] (or now with `force`).
    fn redraw(&mut self, force: bool) {
        if !self.terminal || (!force && self.drawn.is_some_and(|t| t.elapsed() < REDRAW)) {
            return;
        }
        self.drawn = Some(Instant::now());
        let running: Vec<String> = self
            .activities
            .values()
            .filter(|a| a.kind == ACT_BUILD)
            .map(|a| name(&a.path))
            .collect();
        let in_flight: u64 = self.activities.values().map(|a| a.done).sum();
        let mut line = format!("  {} built", self.built);
        if !running.is_empty() {
            line += &format!(", building {}", running.join(" "));
        }
        if self.fetched > 0 {
            line += &format!(", {} fetched", self.fetched);
        }
        if self.copied > 0 || in_flight > 0 {
            line += &format!(
                ", {} copied ({})",
                self.copied,
                human_size(self.bytes + in_flight)
            );
        }
        let width = 120;
        let shown: String = line.chars().take(width).collect();
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[K{shown}");
        let _ = err.flush();
    }

    /// Ends the status line; a summary of what was done (none when nothing was).
    pub fn finish(&mut self) -> Option<String> {
        if self.terminal && self.drawn.is_some() {
            let _ = write!(std::io::stderr(), "\r\x1b[K");
        }
        let mut parts = Vec::new();
        if self.built > 0 {
            parts.push(format!("{} derivation(s) built", self.built));
        }
        if self.failed_seen > 0 {
            parts.push(format!("{} failed", self.failed_seen));
        }
        if self.fetched > 0 {
            parts.push(format!("{} path(s) fetched", self.fetched));
        }
        match (self.copied, self.bytes) {
            (0, _) => {}
            // Nix reports no bytes for small paths.
            (copied, 0) => parts.push(format!("{copied} path(s) copied")),
            (copied, bytes) => {
                parts.push(format!("{copied} path(s) copied ({})", human_size(bytes)))
            }
        }
        (!parts.is_empty()).then(|| parts.join(", "))
    }

    /// The log tail of each build Nix names as failed, then what Nix said (its error last,
    /// where an error's tail of stderr shows it): for the error.
    pub fn failure(&self) -> String {
        let mut failed: Vec<(&String, &VecDeque<String>)> = self
            .logs
            .iter()
            .filter(|(drv, _)| self.messages.iter().any(|m| m.contains(drv.as_str())))
            .collect();
        failed.sort();
        let mut lines = Vec::new();
        for (drv, log) in failed {
            lines.push(format!("last {} log line(s) of {drv}:", log.len()));
            lines.extend(log.iter().map(|line| format!("> {line}")));
        }
        lines.extend(self.messages.iter().cloned());
        lines.join("\n")
    }
}

/// A store path's name: `/nix/store/<hash>-nixos-system-a-2.drv` → `nixos-system-a-2`.
fn name(path: &str) -> String {
    let base = path.rsplit('/').next().unwrap_or(path);
    let base = base.strip_suffix(".drv").unwrap_or(base);
    match base.split_once('-') {
        Some((hash, rest)) if hash.len() == 32 => rest.to_owned(),
        _ => base.to_owned(),
    }
}

/// Text without ANSI escape sequences (Nix colours its messages).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // CSI: ESC [ parameters final-byte.
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_build_leaves_nix_s_message_and_its_log_tail() {
        let mut progress = NixProgress::new();
        progress.terminal = false;
        for line in [
            r#"@nix {"action":"start","id":6,"level":0,"text":"","type":104}"#,
            r#"@nix {"action":"start","fields":["/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-w-1.drv","",1,1],"id":5,"level":3,"text":"building","type":105}"#,
            r#"@nix {"action":"result","fields":[1,2,1,0],"id":6,"type":105}"#,
            r#"@nix {"action":"stop","id":5}"#,
            r#"@nix {"action":"start","fields":["/nix/store/2rsjqkc0i0accshl7xakymazbh2akn9g-x-1.drv","",1,1],"id":7,"level":3,"text":"building","type":105}"#,
            r#"@nix {"action":"result","fields":["building x"],"id":7,"type":101}"#,
            r#"@nix {"action":"result","fields":["sh: cat: \u001b[1mnot found\u001b[0m"],"id":7,"type":101}"#,
            r#"@nix {"action":"result","fields":[1,2,0,1],"id":6,"type":105}"#,
            r#"@nix {"action":"stop","id":7}"#,
            r#"@nix {"action":"start","fields":["/nix/store/yhbvy9i8hzn2adkvqsxlg80n0vxlx6ni-y-1","local","file:///c"],"id":8,"level":3,"text":"copying","type":100}"#,
            r#"@nix {"action":"result","fields":[2048,4096,0,0],"id":8,"type":105}"#,
            r#"@nix {"action":"stop","id":8}"#,
            r#"@nix {"action":"msg","level":0,"msg":"\u001b[31;1merror:\u001b[0m builder for '/nix/store/2rsjqkc0i0accshl7xakymazbh2akn9g-x-1.drv' failed with exit code 127"}"#,
            r#"@nix {"action":"msg","level":5,"msg":"chatter"}"#,
            "a line that is not an event",
        ] {
            progress.line(line);
        }
        assert_eq!(
            progress.failure(),
            "last 2 log line(s) of /nix/store/2rsjqkc0i0accshl7xakymazbh2akn9g-x-1.drv:\n> \
             building x\n> sh: cat: not found\nerror: builder for \
             '/nix/store/2rsjqkc0i0accshl7xakymazbh2akn9g-x-1.drv' failed with exit code 127\na \
             line that is not an event"
        );
        assert_eq!(
            progress.finish().as_deref(),
            Some("1 derivation(s) built, 1 failed, 1 path(s) copied (2.0 KiB)")
        );
    }
}

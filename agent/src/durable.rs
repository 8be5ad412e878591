//! Durable small files: written whole or not at all, and still there after a power cut.

use std::io::Write as _;
use std::path::Path;

/// Writes `bytes` to `path` atomically: a temp file beside it, fsync, rename, fsync of the
/// directory (created when missing).
pub fn write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir)?;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let temp = dir.join(format!(".{name}.tmp"));
    let mut file = std::fs::File::create(&temp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&temp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Flushes every written file of the file system `path` is on (`syncfs`): one call for many
/// files written without an fsync each (a format-2 release's pieces).
pub fn sync_file_system(path: &Path) -> std::io::Result<()> {
    let dir = std::fs::File::open(path)?;
    rustix::fs::syncfs(&dir).map_err(std::io::Error::from)
}

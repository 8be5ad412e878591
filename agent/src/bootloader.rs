//! What the boot default boots, read from the bootloader's own config as NixOS writes it, so a
//! commit can check that `switch-to-configuration boot` really moved it.
//!
//! Every NixOS boot entry starts stage 2 with `init=<toplevel>/init` on the kernel command line;
//! the default entry's `init=` names the system the next boot runs:
//!
//! ```text
//! systemd-boot  <boot>/loader/loader.conf      default nixos-generation-42.conf
//!               <boot>/loader/entries/nixos-generation-42.conf
//!                                              options init=/nix/store/…-nixos-system-…/init …
//! extlinux      <boot>/extlinux/extlinux.conf  DEFAULT nixos-default
//!                                              LABEL nixos-default
//!                                                APPEND init=/nix/store/…-nixos-system-…/init …
//! ```
//!
//! GRUB's generated script, and loaders configured some other way, are not read: the check is
//! then skipped (and said so at debug level).

use std::path::{Path, PathBuf};

/// The boot default as read, or why it could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootDefault {
    /// The system the default entry boots, and the file that says so.
    Boots { toplevel: String, file: PathBuf },
    /// A recognised bootloader whose default entry cannot be followed.
    Unreadable { file: PathBuf, why: String },
    /// No bootloader config this module knows under the boot directory.
    Unknown,
}

/// Reads the boot default from the bootloader config under `boot`.
pub fn read(boot: &Path) -> BootDefault {
    let loader = boot.join("loader/loader.conf");
    if let Ok(text) = std::fs::read_to_string(&loader) {
        return systemd_boot(boot, &loader, &text);
    }
    let extlinux = boot.join("extlinux/extlinux.conf");
    if let Ok(text) = std::fs::read_to_string(&extlinux) {
        return match extlinux_default(&text) {
            Ok(toplevel) => BootDefault::Boots {
                toplevel,
                file: extlinux,
            },
            Err(why) => BootDefault::Unreadable {
                file: extlinux,
                why,
            },
        };
    }
    BootDefault::Unknown
}

fn systemd_boot(boot: &Path, loader: &Path, text: &str) -> BootDefault {
    let unreadable = |file: &Path, why: String| BootDefault::Unreadable {
        file: file.to_owned(),
        why,
    };
    let Some(default) = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("default").map(str::trim))
        .filter(|d| !d.is_empty())
    else {
        return unreadable(loader, "it names no default entry".into());
    };
    if default.contains(['*', '?', '@', '/']) {
        return unreadable(loader, format!("its default '{default}' is not one entry"));
    }
    let name = if default.ends_with(".conf") {
        default.to_owned()
    } else {
        format!("{default}.conf")
    };
    let entry = boot.join("loader/entries").join(name);
    let Ok(text) = std::fs::read_to_string(&entry) else {
        return unreadable(
            loader,
            format!("its default entry {} is missing", entry.display()),
        );
    };
    let options = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("options"))
        .collect::<Vec<_>>()
        .join(" ");
    match init_toplevel(&options) {
        Some(toplevel) => BootDefault::Boots {
            toplevel,
            file: entry,
        },
        None => unreadable(&entry, "its options have no init=/nix/store/…/init".into()),
    }
}

/// The toplevel extlinux's DEFAULT label boots.
pub fn extlinux_default(text: &str) -> Result<String, String> {
    let keyword = |line: &str, word: &str| -> Option<String> {
        let line = line.trim();
        let (first, rest) = line.split_once(char::is_whitespace)?;
        first
            .eq_ignore_ascii_case(word)
            .then(|| rest.trim().to_owned())
    };
    let default = text
        .lines()
        .find_map(|l| keyword(l, "DEFAULT"))
        .ok_or("it names no DEFAULT label")?;
    let mut in_default = false;
    for line in text.lines() {
        if let Some(label) = keyword(line, "LABEL") {
            in_default = label == default;
        } else if in_default {
            if let Some(append) = keyword(line, "APPEND") {
                return init_toplevel(&append)
                    .ok_or_else(|| format!("label {default} has no init=/nix/store/…/init"));
            }
        }
    }
    Err(format!("its DEFAULT label {default} has no APPEND line"))
}

/// The toplevel in a kernel command line's `init=/nix/store/…/init`.
pub fn init_toplevel(command_line: &str) -> Option<String> {
    command_line
        .split_whitespace()
        .filter_map(|word| word.strip_prefix("init="))
        .filter_map(|init| init.strip_suffix("/init"))
        .find(|toplevel| crate::release::StorePath::parse(toplevel).is_ok())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-nixos-system-pi-1";
    const B: &str = "/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-nixos-system-pi-2";

    #[test]
    fn extlinux_default_label_is_followed_to_its_init() {
        let conf = format!(
            "# Generated file, all changes will be lost on nixos-rebuild!\nTIMEOUT 50\n\
             DEFAULT nixos-default\n\nMENU TITLE ------\n\nLABEL nixos-default\n  MENU LABEL \
             NixOS - Default\n  LINUX ../nixos/k-Image\n  APPEND init={B}/init console=ttyS0 \
             loglevel=4\n\nLABEL nixos-1\n  APPEND init={A}/init\n"
        );
        assert_eq!(extlinux_default(&conf), Ok(B.to_owned()));
        assert!(extlinux_default("TIMEOUT 5\n").is_err());
        assert!(extlinux_default("DEFAULT x\nLABEL x\n  APPEND root=/dev/sda\n").is_err());
    }

    #[test]
    fn systemd_boot_default_entry_is_followed_to_its_init() {
        let dir = tempfile::tempdir().unwrap();
        let boot = dir.path();
        std::fs::create_dir_all(boot.join("loader/entries")).unwrap();
        std::fs::write(
            boot.join("loader/loader.conf"),
            "timeout 5\ndefault nixos-generation-2.conf\nconsole-mode keep\n",
        )
        .unwrap();
        std::fs::write(
            boot.join("loader/entries/nixos-generation-2.conf"),
            format!("title NixOS\nlinux /EFI/nixos/k.efi\noptions init={B}/init loglevel=4\n"),
        )
        .unwrap();
        assert_eq!(
            read(boot),
            BootDefault::Boots {
                toplevel: B.to_owned(),
                file: boot.join("loader/entries/nixos-generation-2.conf"),
            }
        );
        std::fs::write(
            boot.join("loader/loader.conf"),
            "default nixos-generation-3\n",
        )
        .unwrap();
        assert!(matches!(read(boot), BootDefault::Unreadable { .. }));
        std::fs::write(boot.join("loader/loader.conf"), "default nixos-*\n").unwrap();
        assert!(matches!(read(boot), BootDefault::Unreadable { .. }));
    }

    #[test]
    fn no_known_bootloader_is_unknown() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()), BootDefault::Unknown);
        assert_eq!(init_toplevel("init=/sbin/init quiet"), None);
        assert_eq!(
            init_toplevel(&format!("quiet init={A}/init")),
            Some(A.to_owned())
        );
    }
}

//! Firmware boot: which firmware a VM's QEMU starts with, and the files it needs (pure).
//!
//! SeaBIOS is built into QEMU. UEFI is OVMF from the node's Debian `ovmf` package: a read-only
//! code image shared by every VM, and a per-VM copy of its variable store (the NVRAM, where
//! the guest keeps its boot entries) in the VM's directory, next to its other files.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::spec::FieldError;

pub mod nvram;

/// A UEFI VM's variable store, in its directory (and in each of its snapshots).
pub const NVRAM_FILE: &str = "uefi-vars.fd";

/// Where Debian's `ovmf` package installs its images.
pub const DEFAULT_OVMF_DIR: &str = "/usr/share/OVMF";

/// The (code, variables) image pairs of Debian's `ovmf` package, preferred first: the 4 MiB
/// build (bookworm and later), then the 2 MiB one of older releases.
pub const OVMF_PAIRS: &[(&str, &str)] = &[
    ("OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd"),
    ("OVMF_CODE.fd", "OVMF_VARS.fd"),
];

/// The firmware a spec asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    #[default]
    Bios,
    Uefi,
}

/// One OVMF build on this node: its code image and the pristine variable store that each VM's
/// NVRAM starts as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ovmf {
    pub code: PathBuf,
    pub vars: PathBuf,
}

/// What QEMU boots with, as files on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Loader {
    SeaBios,
    Uefi(Ovmf),
}

/// The first OVMF pair in `dir` whose two files `exist`.
pub fn pick(dir: &Path, exists: impl Fn(&Path) -> bool) -> Option<Ovmf> {
    OVMF_PAIRS.iter().find_map(|(code, vars)| {
        let ovmf = Ovmf {
            code: dir.join(code),
            vars: dir.join(vars),
        };
        (exists(&ovmf.code) && exists(&ovmf.vars)).then_some(ovmf)
    })
}

/// The loader for `firmware`, given the OVMF found in `ovmf_dir` (if any).
pub fn loader(
    firmware: Firmware,
    ovmf: Option<Ovmf>,
    ovmf_dir: &Path,
) -> Result<Loader, FieldError> {
    match (firmware, ovmf) {
        (Firmware::Bios, _) => Ok(Loader::SeaBios),
        (Firmware::Uefi, Some(ovmf)) => Ok(Loader::Uefi(ovmf)),
        (Firmware::Uefi, None) => {
            let pairs: Vec<String> = OVMF_PAIRS
                .iter()
                .map(|(code, vars)| format!("{code} + {vars}"))
                .collect();
            Err(FieldError::new(
                "spec.firmware",
                format!(
                    "uefi needs OVMF, which is not installed on this node: no {} in {} (install Debian's ovmf package)",
                    pairs.join(" or "),
                    ovmf_dir.display()
                ),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn only(files: &'static [&'static str]) -> impl Fn(&Path) -> bool {
        move |p| files.iter().any(|f| p.ends_with(f))
    }

    #[test]
    fn prefers_the_4m_build_and_needs_both_files() {
        let dir = Path::new("/usr/share/OVMF");
        let both = pick(
            dir,
            only(&[
                "OVMF_CODE_4M.fd",
                "OVMF_VARS_4M.fd",
                "OVMF_CODE.fd",
                "OVMF_VARS.fd",
            ]),
        );
        assert_eq!(both.unwrap().code, dir.join("OVMF_CODE_4M.fd"));
        let old = pick(
            dir,
            only(&["OVMF_CODE_4M.fd", "OVMF_CODE.fd", "OVMF_VARS.fd"]),
        )
        .unwrap();
        assert_eq!(
            (old.code, old.vars),
            (dir.join("OVMF_CODE.fd"), dir.join("OVMF_VARS.fd"))
        );
        assert_eq!(pick(dir, only(&["OVMF_CODE_4M.fd"])), None);
    }

    #[test]
    fn uefi_without_ovmf_names_the_field_and_the_package() {
        let dir = Path::new("/nowhere");
        assert_eq!(loader(Firmware::Bios, None, dir), Ok(Loader::SeaBios));
        let e = loader(Firmware::Uefi, None, dir).unwrap_err();
        assert_eq!(e.field, "spec.firmware");
        assert!(
            e.message.contains("/nowhere") && e.message.contains("ovmf package"),
            "{e}"
        );
        let ovmf = pick(dir, |_| true).unwrap();
        assert_eq!(
            loader(Firmware::Uefi, Some(ovmf.clone()), dir),
            Ok(Loader::Uefi(ovmf))
        );
    }
}

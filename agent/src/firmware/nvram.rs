//! The node side of firmware boot: finding OVMF and giving a VM its own NVRAM file.

use std::io;
use std::path::Path;

use crate::firmware::{Firmware, Loader, NVRAM_FILE, Ovmf, loader, pick};
use crate::spec::FieldError;

/// The OVMF installed in `dir`, if any.
pub fn find(dir: &Path) -> Option<Ovmf> {
    pick(dir, Path::is_file)
}

/// The loader for `firmware` on this node (OVMF looked up in `ovmf_dir` now, so installing the
/// package needs no agent restart).
pub fn resolve(firmware: Firmware, ovmf_dir: &Path) -> Result<Loader, FieldError> {
    let ovmf = match firmware {
        Firmware::Bios => None,
        Firmware::Uefi => find(ovmf_dir),
    };
    loader(firmware, ovmf, ovmf_dir)
}

/// Makes `nvram` (a VM's variable store) from OVMF's pristine one unless it exists: the guest's
/// boot entries survive restarts, and a migrated or restored VM gets the file it had.
pub fn ensure(loader: &Loader, nvram: &Path) -> io::Result<()> {
    let Loader::Uefi(ovmf) = loader else {
        return Ok(());
    };
    if nvram.exists() {
        return Ok(());
    }
    replace(&ovmf.vars, nvram)
}

/// Keeps a copy of the VM's NVRAM (if it has one) in the snapshot directory `snapshot`.
pub fn save(nvram: &Path, snapshot: &Path) -> io::Result<()> {
    match std::fs::copy(nvram, snapshot.join(NVRAM_FILE)) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other.map(drop),
    }
}

/// Puts the NVRAM kept in the snapshot directory `snapshot` (if any) back as the VM's.
pub fn restore(snapshot: &Path, nvram: &Path) -> io::Result<()> {
    let kept = snapshot.join(NVRAM_FILE);
    if !kept.exists() {
        return Ok(());
    }
    replace(&kept, nvram)
}

/// Copies `from` beside `to`, then renames it: a crash never leaves a short file behind.
fn replace(from: &Path, to: &Path) -> io::Result<()> {
    let partial = to.with_extension("partial");
    std::fs::copy(from, &partial)?;
    std::fs::rename(&partial, to)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nvram_is_made_once_and_travels_with_snapshots() {
        let d = tempfile::tempdir().unwrap();
        let (vars, nvram, snap) = (
            d.path().join("VARS.fd"),
            d.path().join(NVRAM_FILE),
            d.path().join("snap"),
        );
        std::fs::create_dir(&snap).unwrap();
        std::fs::write(&vars, b"pristine").unwrap();
        let uefi = Loader::Uefi(Ovmf {
            code: "/c".into(),
            vars,
        });
        ensure(&Loader::SeaBios, &nvram).unwrap();
        assert!(!nvram.exists(), "SeaBIOS needs no NVRAM");
        save(&nvram, &snap).unwrap();
        assert!(
            !snap.join(NVRAM_FILE).exists(),
            "nothing to keep without one"
        );
        ensure(&uefi, &nvram).unwrap();
        assert_eq!(std::fs::read(&nvram).unwrap(), b"pristine");
        std::fs::write(&nvram, b"boot entries").unwrap();
        ensure(&uefi, &nvram).unwrap();
        assert_eq!(std::fs::read(&nvram).unwrap(), b"boot entries", "kept");
        save(&nvram, &snap).unwrap();
        std::fs::write(&nvram, b"later").unwrap();
        restore(&snap, &nvram).unwrap();
        assert_eq!(std::fs::read(&nvram).unwrap(), b"boot entries");
    }
}

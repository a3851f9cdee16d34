//! The node side of firmware boot: finding OVMF and giving a VM its own NVRAM file.

use std::io;
use std::path::Path;

use crate::firmware::{Firmware, Loader, Ovmf, loader, pick};
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
    // Copied beside the target, then renamed: a crash never leaves a short file behind.
    let partial = nvram.with_extension("fd.partial");
    std::fs::copy(&ovmf.vars, &partial)?;
    std::fs::rename(&partial, nvram)
}

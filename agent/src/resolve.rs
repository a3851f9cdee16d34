//! Turns the paths a spec names into the host files QEMU will open, or a field error.

use crate::image;
use crate::paths::PathPolicy;
use crate::spec::{FieldError, VmSpec};

/// Resolves kernel, initrd and disks inside the allowed roots and reads each disk's format.
/// Runs at create time (early errors) and again at every start (files may have changed).
pub fn resolve_spec(spec: &VmSpec, policy: &PathPolicy) -> Result<VmSpec, FieldError> {
    let mut out = spec.clone();
    out.boot.kernel = policy.resolve_file("spec.boot.kernel", &spec.boot.kernel)?;
    if let Some(initrd) = &spec.boot.initrd {
        out.boot.initrd = Some(policy.resolve_file("spec.boot.initrd", initrd)?);
    }
    for (i, disk) in out.disks.iter_mut().enumerate() {
        let field = format!("spec.disks[{i}].path");
        disk.path = policy.resolve_file(&field, &disk.path)?;
        disk.format = Some(image::inspect(&field, &disk.path, disk.format, policy)?);
    }
    Ok(out)
}

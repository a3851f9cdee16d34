//! Turns the paths a spec names into the host files QEMU will open, or a field error.

use std::path::Path;

use crate::host::image;
use crate::host::paths::PathPolicy;
use crate::snapshot::files::DiskLayers;
use crate::spec::{FieldError, VmSpec};

/// Resolves kernel, initrd and disks inside the allowed roots and reads each disk's format.
/// Runs at create time (early errors) and again at every start (files may have changed).
pub fn resolve_spec(spec: &VmSpec, policy: &PathPolicy) -> Result<VmSpec, FieldError> {
    let mut out = spec.clone();
    if let Some(boot) = out.boot.as_mut() {
        boot.kernel = policy.resolve_file("spec.boot.kernel", &boot.kernel)?;
        if let Some(initrd) = &boot.initrd {
            boot.initrd = Some(policy.resolve_file("spec.boot.initrd", initrd)?);
        }
    }
    for (i, disk) in out.disks.iter_mut().enumerate() {
        let field = format!("spec.disks[{i}].path");
        disk.path = policy.resolve_file(&field, &disk.path)?;
        disk.format = Some(image::inspect(&field, &disk.path, disk.format, policy)?);
    }
    Ok(out)
}

/// Resolves `spec` with each disk on its layer from `layers` (after snapshots). The spec's own
/// paths must be inside the allowed roots, the layers (files of the agent's) inside
/// `layers_dir`, and their backing chains in either.
pub fn resolve_with_layers(
    spec: &VmSpec,
    layers: &DiskLayers,
    layers_dir: &Path,
    policy: &PathPolicy,
) -> Result<VmSpec, FieldError> {
    let mut out = resolve_spec(spec, policy)?;
    if layers.active.is_empty() {
        return Ok(out);
    }
    let io =
        |e: std::io::Error| FieldError::new("layers", format!("{}: {e}", layers_dir.display()));
    let own = PathPolicy::new([layers_dir.to_path_buf()]).map_err(io)?;
    let chains = policy.with(layers_dir).map_err(io)?;
    for (i, disk) in out.disks.iter_mut().enumerate() {
        if let Some(layer) = layers.active.get(&disk.name) {
            let field = format!("spec.disks[{i}] (snapshot layer)");
            disk.path = own.resolve_file(&field, layer)?;
            disk.format = Some(image::inspect(&field, &disk.path, None, &chains)?);
        }
    }
    Ok(out)
}

//! `qemu-img`, run as a child process: the overlays snapshots and restores run on, layers
//! merged back into a disk, and the copies of a stopped VM's disks.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use crate::spec::DiskFormat;

#[derive(Debug, thiserror::Error)]
pub enum QemuImgError {
    #[error("running {}: {source}", program.display())]
    Spawn {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// qemu-img ran and failed; `stderr` holds its own words.
    #[error("qemu-img {subcommand}: {stderr}")]
    Failed { subcommand: String, stderr: String },
}

/// Runs `program` (qemu-img) with `args`, the subcommand first.
async fn run(program: &Path, args: &[&OsStr]) -> Result<(), QemuImgError> {
    let out = tokio::process::Command::new(program)
        .args(args)
        .output()
        .await
        .map_err(|source| QemuImgError::Spawn {
            program: program.to_path_buf(),
            source,
        })?;
    if !out.status.success() {
        return Err(QemuImgError::Failed {
            subcommand: args
                .first()
                .map_or_else(String::new, |a| a.to_string_lossy().into_owned()),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// A new qcow2 image at `file`, over `backing` (its path and format) if given, of `size` bytes
/// if given (else the backing file's size).
pub async fn create(
    program: &Path,
    file: &Path,
    backing: Option<(&Path, &str)>,
    size: Option<u64>,
) -> Result<(), QemuImgError> {
    let mut args: Vec<&OsStr> = ["create", "-q", "-f", "qcow2"].map(OsStr::new).to_vec();
    if let Some((path, format)) = backing {
        args.extend([OsStr::new("-b"), path.as_os_str()]);
        args.extend([OsStr::new("-F"), OsStr::new(format)]);
    }
    args.push(file.as_os_str());
    let size = size.map(|s| s.to_string());
    args.extend(size.as_deref().map(OsStr::new));
    run(program, &args).await
}

/// A qcow2 copy of `from` (read as `format`) at `to`: whole, or with `backing` (its path and
/// format) only what `from` holds above that backing file, over the same one.
pub async fn convert(
    program: &Path,
    from: &Path,
    format: DiskFormat,
    to: &Path,
    backing: Option<(&Path, &str)>,
) -> Result<(), QemuImgError> {
    let mut args: Vec<&OsStr> = ["convert", "-q", "-f", format.as_str(), "-O", "qcow2"]
        .map(OsStr::new)
        .to_vec();
    if let Some((path, format)) = backing {
        args.extend([OsStr::new("-B"), path.as_os_str()]);
        args.extend([OsStr::new("-F"), OsStr::new(format)]);
    }
    args.extend([from.as_os_str(), to.as_os_str()]);
    run(program, &args).await
}

/// Writes the chain from `top` down into `base`.
pub async fn commit(program: &Path, base: &Path, top: &Path) -> Result<(), QemuImgError> {
    let mut args: Vec<&OsStr> = ["commit", "-q", "-b"].map(OsStr::new).to_vec();
    args.extend([base.as_os_str(), top.as_os_str()]);
    run(program, &args).await
}

/// Adds or removes (`op`: `--add` / `--remove`) persistent dirty bitmap `name` of qcow2 `file`.
pub async fn bitmap(program: &Path, file: &Path, op: &str, name: &str) -> Result<(), QemuImgError> {
    let args = [
        OsStr::new("bitmap"),
        OsStr::new(op),
        file.as_os_str(),
        OsStr::new(name),
    ];
    run(program, &args).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn says_which_program_and_subcommand_failed() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no-qemu-img");
        let e = run(&missing, &[OsStr::new("info")]).await.unwrap_err();
        assert!(
            matches!(&e, QemuImgError::Spawn { program, .. } if *program == missing),
            "{e}"
        );
        // A program that fails the way qemu-img does: its words on stderr.
        let script = "echo '  no such image ' >&2; exit 1";
        let e = run(
            Path::new("/bin/sh"),
            &[OsStr::new("-c"), OsStr::new(script)],
        )
        .await
        .unwrap_err();
        assert_eq!(e.to_string(), "qemu-img -c: no such image");
    }
}

//! Disk image facts read from the file header: its format, and any other host file it refers to.
//!
//! A qcow2 image can name a backing file or an external data file, which QEMU opens too. Those
//! references are checked against the same [`PathPolicy`] as the image itself.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::host::paths::PathPolicy;
use crate::spec::{DiskFormat, FieldError};

const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";
/// Incompatible feature bit: the guest data lives in an external file.
const QCOW2_EXTERNAL_DATA_FILE: u64 = 1 << 2;
/// Longest backing chain accepted (each snapshot adds a layer to a disk's chain).
const MAX_CHAIN: usize = 64;

/// What the first bytes of an image say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Header {
    Raw,
    Qcow2 {
        backing_file: Option<String>,
        /// The backing file's format as recorded in the header (extension 0xE2792ACA); without
        /// it QEMU would probe the backing file's format.
        backing_format: Option<String>,
        external_data_file: bool,
    },
}

const BACKING_FORMAT_EXT: u32 = 0xE279_2ACA;

/// Why an image header could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("truncated qcow2 header")]
    Truncated,
    #[error("qcow2 backing file name is too long ({0} bytes)")]
    BackingNameTooLong(usize),
}

/// Parses an image header (pure). `read_at(offset, len)` supplies bytes past the header buffer.
pub fn parse_header(
    head: &[u8],
    read_at: impl Fn(u64, usize) -> std::io::Result<Vec<u8>>,
) -> Result<Header, HeaderError> {
    if head.len() < 4 || &head[..4] != QCOW2_MAGIC {
        return Ok(Header::Raw);
    }
    let be64 = |o: usize| {
        head.get(o..o + 8)
            .map(|b| u64::from_be_bytes(b.try_into().unwrap()))
    };
    let be32 = |o: usize| {
        head.get(o..o + 4)
            .map(|b| u32::from_be_bytes(b.try_into().unwrap()))
    };
    let version = be32(4).ok_or(HeaderError::Truncated)?;
    let backing_offset = be64(8).ok_or(HeaderError::Truncated)?;
    let backing_len = be32(16).ok_or(HeaderError::Truncated)? as usize;
    let incompatible = if version >= 3 {
        be64(72).ok_or(HeaderError::Truncated)?
    } else {
        0
    };
    let backing_file = if backing_offset == 0 || backing_len == 0 {
        None
    } else if backing_len > 1023 {
        return Err(HeaderError::BackingNameTooLong(backing_len));
    } else {
        let name = read_at(backing_offset, backing_len)?;
        Some(String::from_utf8_lossy(&name).into_owned())
    };
    // Header extensions follow the header: at 72 (v2) or at header_length (v3).
    let mut at = if version >= 3 {
        be32(100).ok_or(HeaderError::Truncated)? as usize
    } else {
        72
    };
    let mut backing_format = None;
    while let (Some(kind), Some(len)) = (be32(at), be32(at + 4)) {
        let len = len as usize;
        if kind == 0 || at + 8 + len > head.len() {
            break;
        }
        if kind == BACKING_FORMAT_EXT {
            backing_format =
                Some(String::from_utf8_lossy(&head[at + 8..at + 8 + len]).into_owned());
        }
        at += 8 + len.div_ceil(8) * 8;
    }
    Ok(Header::Qcow2 {
        backing_file,
        backing_format,
        external_data_file: incompatible & QCOW2_EXTERNAL_DATA_FILE != 0,
    })
}

pub(crate) fn read_header(path: &Path) -> Result<Header, HeaderError> {
    use std::os::unix::fs::FileExt;
    let mut f = std::fs::File::open(path)?;
    let mut head = vec![0u8; 4096];
    let n = f.read(&mut head)?;
    head.truncate(n);
    parse_header(&head, |offset, len| {
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    })
}

/// The backing file `path` names in its qcow2 header (relative names are taken from `path`'s
/// directory, as QEMU does), or None for a raw image, an image without one, or an unreadable file.
pub fn backing_file(path: &Path) -> Option<PathBuf> {
    backing(path).map(|(file, _)| file)
}

/// [`backing_file`] with the backing format the header records ("" when it records none).
pub fn backing(path: &Path) -> Option<(PathBuf, String)> {
    match read_header(path).ok()? {
        Header::Qcow2 {
            backing_file: Some(name),
            backing_format,
            ..
        } => Some((
            path.parent().unwrap_or(Path::new("/")).join(name),
            backing_format.unwrap_or_default(),
        )),
        _ => None,
    }
}

/// Checks a resolved image and its backing chain; returns the format QEMU should open it with.
pub fn inspect(
    field: &str,
    path: &Path,
    declared: Option<DiskFormat>,
    policy: &PathPolicy,
) -> Result<DiskFormat, FieldError> {
    let header = read_header(path).map_err(|e| unreadable(field, path, e))?;
    let detected = match header {
        Header::Raw => DiskFormat::Raw,
        Header::Qcow2 { .. } => DiskFormat::Qcow2,
    };
    let format = match (declared, detected) {
        (Some(DiskFormat::Qcow2), DiskFormat::Raw) => {
            return Err(FieldError::new(
                field,
                format!(
                    "{} is declared qcow2 but has no qcow2 header",
                    path.display()
                ),
            ));
        }
        (Some(f), _) => f,
        (None, d) => d,
    };
    if format == DiskFormat::Qcow2 {
        check_chain(field, path, header, policy)?;
    }
    Ok(format)
}

fn unreadable(field: &str, path: &Path, e: HeaderError) -> FieldError {
    FieldError::new(field, format!("{}: {e}", path.display()))
}

/// Walks the backing chain of a qcow2 image: each link must stay inside the allowed roots.
fn check_chain(
    field: &str,
    path: &Path,
    mut header: Header,
    policy: &PathPolicy,
) -> Result<(), FieldError> {
    let mut current: PathBuf = path.to_path_buf();
    for _ in 0..MAX_CHAIN {
        let Header::Qcow2 {
            backing_file,
            backing_format,
            external_data_file,
        } = header
        else {
            return Ok(());
        };
        if external_data_file {
            return Err(FieldError::new(
                field,
                format!(
                    "{} uses an external data file, which is not supported",
                    current.display()
                ),
            ));
        }
        let Some(name) = backing_file else {
            return Ok(());
        };
        let (opened, next) = backing_link(field, &current, &name, &backing_format, policy)?;
        header = read_header(&next).map_err(|e| unreadable(field, &next, e))?;
        if backing_format.as_deref() == Some("raw") {
            // Opened as raw: whatever its bytes look like, nothing more is followed.
            return Ok(());
        }
        current = opened;
    }
    Err(FieldError::new(
        field,
        format!(
            "{} has a backing chain longer than {MAX_CHAIN}",
            path.display()
        ),
    ))
}

/// The backing file `name` of `current`, as QEMU would open it and as resolved on disk;
/// refused unless it is a plain file name with a recorded format, inside the roots.
fn backing_link(
    field: &str,
    current: &Path,
    name: &str,
    format: &Option<String>,
    policy: &PathPolicy,
) -> Result<(PathBuf, PathBuf), FieldError> {
    let refuse = |why: &str| {
        FieldError::new(
            field,
            format!("backing file of {}: {why}", current.display()),
        )
    };
    // QEMU reads "json:{...}", "nbd:..." and other protocol prefixes as options.
    if name.contains(':') {
        return Err(refuse(&format!("{name:?} is not a plain file name")));
    }
    // Without a recorded format QEMU probes the file, and a probed format (a VMDK descriptor,
    // say) can name further host files.
    if !matches!(format.as_deref(), Some("qcow2" | "raw")) {
        return Err(refuse(
            "its format must be recorded as qcow2 or raw (qemu-img -F)",
        ));
    }
    // Relative names are resolved as QEMU does: against the path as opened, not its
    // canonical form.
    let opened = current.parent().unwrap_or(Path::new("/")).join(name);
    let next = policy
        .resolve_file(field, &opened)
        .map_err(|e| refuse(&e.message))?;
    Ok((opened, next))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qcow2_header(version: u32, backing: Option<&str>, incompatible: u64) -> Vec<u8> {
        qcow2_header_fmt(version, backing.map(|b| (b, "qcow2")), incompatible)
    }

    /// A qcow2 header; with a backing file, its format goes in the 0xE2792ACA extension.
    fn qcow2_header_fmt(version: u32, backing: Option<(&str, &str)>, incompatible: u64) -> Vec<u8> {
        let mut h = vec![0u8; 512];
        h[..4].copy_from_slice(QCOW2_MAGIC);
        h[4..8].copy_from_slice(&version.to_be_bytes());
        h[100..104].copy_from_slice(&104u32.to_be_bytes());
        if let Some((b, fmt)) = backing {
            h[8..16].copy_from_slice(&200u64.to_be_bytes());
            h[16..20].copy_from_slice(&(b.len() as u32).to_be_bytes());
            h[200..200 + b.len()].copy_from_slice(b.as_bytes());
            if !fmt.is_empty() {
                h[104..108].copy_from_slice(&BACKING_FORMAT_EXT.to_be_bytes());
                h[108..112].copy_from_slice(&(fmt.len() as u32).to_be_bytes());
                h[112..112 + fmt.len()].copy_from_slice(fmt.as_bytes());
            }
        }
        h[72..80].copy_from_slice(&incompatible.to_be_bytes());
        h
    }

    fn parse(h: &[u8]) -> Header {
        parse_header(h, |o, l| Ok(h[o as usize..o as usize + l].to_vec())).unwrap()
    }

    #[test]
    fn reads_format_backing_file_and_data_file_bit() {
        assert_eq!(parse(b"\0\0\0\0 not an image"), Header::Raw);
        assert_eq!(
            parse(&qcow2_header(3, None, 0)),
            Header::Qcow2 {
                backing_file: None,
                backing_format: None,
                external_data_file: false
            }
        );
        assert_eq!(
            parse(&qcow2_header(3, Some("/etc/shadow"), 0)),
            Header::Qcow2 {
                backing_file: Some("/etc/shadow".into()),
                backing_format: Some("qcow2".into()),
                external_data_file: false
            }
        );
        assert_eq!(
            parse(&qcow2_header(3, None, QCOW2_EXTERNAL_DATA_FILE)),
            Header::Qcow2 {
                backing_file: None,
                backing_format: None,
                external_data_file: true
            }
        );
        // Version 2 has no feature fields: bytes 72.. are not read as flags.
        assert_eq!(
            parse(&qcow2_header(2, None, QCOW2_EXTERNAL_DATA_FILE)),
            Header::Qcow2 {
                backing_file: None,
                backing_format: None,
                external_data_file: false
            }
        );
        assert!(matches!(
            parse_header(&QCOW2_MAGIC[..], |_, _| unreachable!()),
            Err(HeaderError::Truncated)
        ));
        let mut long = qcow2_header(3, Some("base"), 0);
        long[16..20].copy_from_slice(&2000u32.to_be_bytes());
        assert!(matches!(
            parse_header(&long, |_, _| unreachable!()),
            Err(HeaderError::BackingNameTooLong(2000))
        ));
    }

    #[test]
    fn refuses_a_backing_file_outside_the_roots() {
        let root = tempfile::tempdir().unwrap();
        let policy = PathPolicy::new([root.path().to_path_buf()]).unwrap();
        let evil = root.path().join("evil.qcow2");
        std::fs::write(&evil, qcow2_header(3, Some("/etc/passwd"), 0)).unwrap();
        let e = inspect("spec.disks[0].path", &evil, None, &policy).unwrap_err();
        assert!(e.message.contains("outside the allowed"), "{e}");

        let base = root.path().join("base.qcow2");
        std::fs::write(&base, qcow2_header(3, None, 0)).unwrap();
        let overlay = root.path().join("overlay.qcow2");
        std::fs::write(&overlay, qcow2_header(3, Some("base.qcow2"), 0)).unwrap();
        assert_eq!(inspect("f", &overlay, None, &policy), Ok(DiskFormat::Qcow2));

        // Protocol-style names and unrecorded formats are refused before any file is looked at.
        let json = root.path().join("json.qcow2");
        let name = r#"json:{"driver":"raw","file":{"driver":"file","filename":"/etc/shadow"}}"#;
        std::fs::write(&json, qcow2_header(3, Some(name), 0)).unwrap();
        let e = inspect("f", &json, None, &policy).unwrap_err();
        assert!(e.message.contains("not a plain file name"), "{e}");
        let probed = root.path().join("probed.qcow2");
        std::fs::write(&probed, qcow2_header_fmt(3, Some(("base.qcow2", "")), 0)).unwrap();
        let e = inspect("f", &probed, None, &policy).unwrap_err();
        assert!(e.message.contains("must be recorded"), "{e}");

        let raw = root.path().join("disk.raw");
        std::fs::write(&raw, vec![0u8; 1024]).unwrap();
        assert_eq!(inspect("f", &raw, None, &policy), Ok(DiskFormat::Raw));
        assert!(inspect("f", &raw, Some(DiskFormat::Qcow2), &policy).is_err());
    }
}

//! Disk images a VM is made from: where they come from (a URL or a node path), the digest they
//! must have, and where the node's content-addressed cache keeps them.
//!
//! Pure: parsing, cache layout, progress figures, and the digest itself (fed by
//! [`fetch`], which does the I/O; [`cache`] makes one fetch per image).

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::spec::{FieldError, check_path_shape};

pub mod cache;
pub mod fetch;

/// Longest image source accepted (a URL or a path).
const MAX_SOURCE: usize = 4096;

/// A digest algorithm an image checksum may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    Sha256,
    Sha512,
}

impl Algorithm {
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    /// Hex digits of a digest.
    fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }
}

/// `sha256:<hex>` or `sha512:<hex>`, kept lowercase.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Checksum {
    pub algorithm: Algorithm,
    pub hex: String,
}

/// Why a checksum string is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChecksumError {
    #[error("{0:?} must be \"sha256:<64 hex digits>\" or \"sha512:<128 hex digits>\"")]
    Shape(String),
    #[error("{algorithm} digests have {expected} hex digits, {got:?} has {}", got.len())]
    Length {
        algorithm: &'static str,
        expected: usize,
        got: String,
    },
}

impl std::str::FromStr for Checksum {
    type Err = ChecksumError;

    fn from_str(s: &str) -> Result<Self, ChecksumError> {
        let shape = || ChecksumError::Shape(s.to_string());
        let (name, hex) = s.split_once(':').ok_or_else(shape)?;
        let algorithm = match name {
            "sha256" => Algorithm::Sha256,
            "sha512" => Algorithm::Sha512,
            _ => return Err(shape()),
        };
        if !hex.bytes().all(|b| b.is_ascii_hexdigit()) || hex.is_empty() {
            return Err(shape());
        }
        if hex.len() != algorithm.hex_len() {
            return Err(ChecksumError::Length {
                algorithm: algorithm.name(),
                expected: algorithm.hex_len(),
                got: hex.to_string(),
            });
        }
        Ok(Checksum {
            algorithm,
            hex: hex.to_ascii_lowercase(),
        })
    }
}

impl TryFrom<String> for Checksum {
    type Error = ChecksumError;
    fn try_from(s: String) -> Result<Self, ChecksumError> {
        s.parse()
    }
}

impl From<Checksum> for String {
    fn from(c: Checksum) -> String {
        c.to_string()
    }
}

impl fmt::Display for Checksum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm.name(), self.hex)
    }
}

/// A running digest of the bytes of an image as they stream by.
pub enum Hasher {
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl Hasher {
    pub fn new(algorithm: Algorithm) -> Self {
        match algorithm {
            Algorithm::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            Algorithm::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
        }
    }

    pub fn update(&mut self, bytes: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(bytes),
            Hasher::Sha512(h) => h.update(bytes),
        }
    }

    pub fn finish(self) -> Checksum {
        let (algorithm, bytes) = match self {
            Hasher::Sha256(h) => (Algorithm::Sha256, h.finalize().to_vec()),
            Hasher::Sha512(h) => (Algorithm::Sha512, h.finalize().to_vec()),
        };
        let hex = bytes.iter().map(|b| format!("{b:02x}")).collect();
        Checksum { algorithm, hex }
    }
}

/// Where an image comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Source {
    Url(String),
    Path(PathBuf),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Url(u) => f.write_str(u),
            Source::Path(p) => write!(f, "{}", p.display()),
        }
    }
}

/// An image and the digest it must have. A URL needs one: the cache is addressed by it. A node
/// path without one is used in place, as the base of the VM's overlay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageRef {
    pub source: Source,
    pub checksum: Option<Checksum>,
}

/// Checks `source` and `checksum` of the image in field `field` (e.g. "spec.disks[0].image").
pub fn parse_image(field: &str, source: &str, checksum: &str) -> Result<ImageRef, FieldError> {
    let source_field = format!("{field}.source");
    if source.len() > MAX_SOURCE {
        return Err(FieldError::new(
            source_field,
            format!("is longer than {MAX_SOURCE} characters"),
        ));
    }
    let source = if source.starts_with("http://") || source.starts_with("https://") {
        let url = reqwest::Url::parse(source)
            .map_err(|e| FieldError::new(&source_field, format!("{source:?}: {e}")))?;
        if url.host_str().is_none_or(str::is_empty) {
            return Err(FieldError::new(
                source_field,
                format!("{source:?} has no host"),
            ));
        }
        Source::Url(url.to_string())
    } else if source.contains("://") {
        return Err(FieldError::new(
            source_field,
            format!("{source:?}: only http://, https:// or an absolute path on the node"),
        ));
    } else {
        Source::Path(check_path_shape(&source_field, source)?)
    };
    let checksum = match checksum {
        "" => None,
        c => Some(
            c.parse::<Checksum>()
                .map_err(|e| FieldError::new(format!("{field}.checksum"), e.to_string()))?,
        ),
    };
    if matches!(source, Source::Url(_)) && checksum.is_none() {
        return Err(FieldError::new(
            format!("{field}.checksum"),
            "is required for an http(s) image (sha256:<hex> or sha512:<hex>)",
        ));
    }
    Ok(ImageRef { source, checksum })
}

/// The cache file of the image with digest `checksum`: `DIR/<algorithm>-<hex>.qcow2`. Always
/// qcow2 (raw downloads are converted), never written after it appears.
pub fn cached_path(cache_dir: &Path, checksum: &Checksum) -> PathBuf {
    cache_dir.join(format!(
        "{}-{}.qcow2",
        checksum.algorithm.name(),
        checksum.hex
    ))
}

/// Downloads under way: never opened as images, emptied when the agent starts (an
/// interrupted download starts again from the beginning).
pub fn partial_dir(cache_dir: &Path) -> PathBuf {
    cache_dir.join(".partial")
}

/// Whole percent of `done` out of `total` (0 while the length is unknown).
pub fn percent(done: u64, total: u64) -> u32 {
    match total {
        0 => 0,
        t => (done.min(t) as u128 * 100 / t as u128) as u32,
    }
}

/// What a fetched file holds, by its first bytes and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Qcow2,
    /// A raw disk: converted to qcow2 for the cache.
    Raw,
}

/// Formats recognised by their first bytes that QEMU could open but the cache does not take
/// (some can name further host files; compressed files are not disks yet).
const OTHER_FORMATS: &[(&[u8], &str)] = &[
    (b"KDMV", "a VMDK image"),
    (b"# Disk DescriptorFile", "a VMDK descriptor"),
    (b"vhdxfile", "a VHDX image"),
    (b"conectix", "a VHD image"),
    (b"<<< ", "a VDI image"),
    (b"\x1f\x8b", "gzip-compressed"),
    (b"\xfd7zXZ", "xz-compressed"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed"),
    (b"BZh", "bzip2-compressed"),
    (b"<", "text (HTML or XML)"),
];

/// Whether a file of `len` bytes starting with `head` can be a VM's disk image: qcow2, or a raw
/// disk (whole 512-byte sectors). Anything else is refused, saying what it looks like.
pub fn classify(
    head: &[u8],
    len: u64,
    header: &crate::host::image::Header,
) -> Result<Kind, String> {
    use crate::host::image::Header;
    if let Header::Qcow2 {
        backing_file,
        external_data_file,
        ..
    } = header
    {
        if let Some(b) = backing_file {
            return Err(format!(
                "a qcow2 image with a backing file ({b:?}) is not self-contained"
            ));
        }
        if *external_data_file {
            return Err("a qcow2 image with an external data file is not self-contained".into());
        }
        return Ok(Kind::Qcow2);
    }
    if let Some((_, what)) = OTHER_FORMATS
        .iter()
        .find(|(magic, _)| head.starts_with(magic))
    {
        return Err(format!("it is {what}; only qcow2 and raw images are taken"));
    }
    if len == 0 || !len.is_multiple_of(512) {
        return Err(format!(
            "it is neither qcow2 nor a raw disk ({len} bytes is not a whole number of 512-byte sectors)"
        ));
    }
    Ok(Kind::Raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA256_EMPTY: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parses_checksums() {
        let c: Checksum = format!("sha256:{}", SHA256_EMPTY.to_uppercase())
            .parse()
            .unwrap();
        assert_eq!(c.algorithm, Algorithm::Sha256);
        assert_eq!(
            c.to_string(),
            format!("sha256:{SHA256_EMPTY}"),
            "kept lowercase"
        );
        let c: Checksum = format!("sha512:{}", "a".repeat(128)).parse().unwrap();
        assert_eq!(c.algorithm, Algorithm::Sha512);
        for bad in [
            "",
            "sha256",
            "md5:abcd",
            "sha256:",
            "sha256:xyz",
            "SHA256:ab",
        ] {
            assert!(
                matches!(bad.parse::<Checksum>(), Err(ChecksumError::Shape(_))),
                "{bad}"
            );
        }
        let e = "sha512:abcd".parse::<Checksum>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "sha512 digests have 128 hex digits, \"abcd\" has 4"
        );
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<Checksum>(&json).unwrap(), c);
    }

    #[test]
    fn hashes_what_streams_by() {
        let mut h = Hasher::new(Algorithm::Sha256);
        h.update(b"");
        assert_eq!(h.finish().hex, SHA256_EMPTY);
        let mut h = Hasher::new(Algorithm::Sha256);
        h.update(b"ab");
        h.update(b"c");
        assert_eq!(
            h.finish().hex,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let mut h = Hasher::new(Algorithm::Sha512);
        h.update(b"abc");
        assert!(h.finish().hex.starts_with("ddaf35a193617aba"));
    }

    #[test]
    fn image_sources_name_the_field() {
        let sum = format!("sha256:{SHA256_EMPTY}");
        let i = parse_image("f", "http://127.0.0.1:8080/disk.qcow2", &sum).unwrap();
        assert_eq!(
            i.source,
            Source::Url("http://127.0.0.1:8080/disk.qcow2".into())
        );
        let i = parse_image("f", "/srv/images/disk.qcow2", "").unwrap();
        assert_eq!(i.source, Source::Path("/srv/images/disk.qcow2".into()));
        assert_eq!(i.checksum, None);
        let field = |s: &str, c: &str| parse_image("spec.disks[0].image", s, c).unwrap_err().field;
        assert_eq!(field("http://x/disk", ""), "spec.disks[0].image.checksum");
        assert_eq!(
            field("http://x/disk", "sha1:ab"),
            "spec.disks[0].image.checksum"
        );
        assert_eq!(field("ftp://x/disk", &sum), "spec.disks[0].image.source");
        assert_eq!(field("http://", &sum), "spec.disks[0].image.source");
        assert_eq!(field("disk.qcow2", ""), "spec.disks[0].image.source");
        assert_eq!(field("/a/../etc/shadow", ""), "spec.disks[0].image.source");
        assert_eq!(field(&"/a".repeat(3000), ""), "spec.disks[0].image.source");
    }

    #[test]
    fn only_qcow2_and_raw_disks_are_images() {
        use crate::host::image::Header;
        let qcow2 = |backing: Option<&str>| Header::Qcow2 {
            backing_file: backing.map(String::from),
            backing_format: None,
            external_data_file: false,
        };
        assert_eq!(classify(b"QFI\xfb", 1 << 20, &qcow2(None)), Ok(Kind::Qcow2));
        let e = classify(b"QFI\xfb", 1 << 20, &qcow2(Some("/etc/shadow"))).unwrap_err();
        assert!(e.contains("backing file"), "{e}");
        assert_eq!(classify(&[0; 512], 1 << 20, &Header::Raw), Ok(Kind::Raw));
        let e = classify(b"<html>no</html>", 15, &Header::Raw).unwrap_err();
        assert!(e.contains("text"), "{e}");
        let e = classify(b"plain words", 11, &Header::Raw).unwrap_err();
        assert!(e.contains("512-byte sectors"), "{e}");
        let e = classify(b"\x1f\x8b\x08", 1024, &Header::Raw).unwrap_err();
        assert!(e.contains("gzip"), "{e}");
        assert!(classify(b"", 0, &Header::Raw).is_err());
    }

    #[test]
    fn cache_layout_is_by_digest() {
        let c: Checksum = format!("sha256:{SHA256_EMPTY}").parse().unwrap();
        assert_eq!(
            cached_path(Path::new("/d/cache"), &c),
            PathBuf::from(format!("/d/cache/sha256-{SHA256_EMPTY}.qcow2"))
        );
        assert_eq!(
            partial_dir(Path::new("/d/cache")),
            Path::new("/d/cache/.partial")
        );
        assert_eq!(percent(5, 10), 50);
        assert_eq!(percent(5, 0), 0);
        assert_eq!(percent(20, 10), 100);
        assert_eq!(percent(u64::MAX - 1, u64::MAX), 99);
    }
}

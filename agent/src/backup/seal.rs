//! A chunk as stored: zstd-compressed, then (with a key) encrypted with AES-256-GCM.
//!
//! Blob: `HSC1`, one flags byte (1: zstd, 2: AES-256-GCM), with encryption a 12-byte nonce, then
//! the body (ciphertext and 16-byte tag). The nonce is 96 random bits from the OS generator,
//! drawn for every blob: the same key seals at most one blob per chunk id, far below the 2^32
//! random-nonce messages per key that NIST SP 800-38D allows. The chunk id is the associated
//! data, so a blob stored under another chunk's name fails authentication. Reading a chunk
//! always checks that its content hashes to its id (a flipped bit in an unencrypted chunk is
//! found too).
//!
//! Keys: the user's 32-byte key is never used directly nor stored. Three values are derived
//! from it by domain-separated SHA-256: the AES key, the key chunk ids are hashed with, and
//! the check value manifests carry to refuse a wrong key up front.

use aes_gcm::aead::{Aead, KeyInit, OsRng, Payload, rand_core::RngCore};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use sha2::{Digest, Sha256};

use super::{chunk_id, hex};

const MAGIC: &[u8; 4] = b"HSC1";
const ZSTD: u8 = 1;
const AES: u8 = 2;
const NONCE: usize = 12;
/// zstd's fastest levels keep up with S3; higher ones cost far more CPU for a few percent.
const ZSTD_LEVEL: i32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("not a chunk blob (bad header)")]
    Header,
    #[error("decryption failed: wrong key, or the chunk was altered")]
    Decrypt,
    #[error("the chunk is encrypted and no key was given")]
    NoKey,
    #[error("decompressing: {0}")]
    Decompress(#[source] std::io::Error),
    #[error("compressing: {0}")]
    Compress(#[source] std::io::Error),
    #[error("content does not match its id (corrupted chunk)")]
    Digest,
    #[error("{0} bytes where at most {1} were expected")]
    TooLong(usize, usize),
}

/// The keys derived from a backup key.
#[derive(Clone)]
pub struct Keys {
    cipher: Aes256Gcm,
    pub id_key: [u8; 32],
    pub check: String,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key material: requests and errors get logged.
        f.write_str("Keys(..)")
    }
}

fn derive(domain: &str, key: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"hypersdk-backup\0");
    h.update(domain.as_bytes());
    h.update(b"\0");
    h.update(key);
    h.finalize().into()
}

impl Keys {
    /// From the key in the Secret: 32 raw bytes, or 64 hex digits (as `openssl rand -hex 32`
    /// makes it, with or without a newline).
    pub fn new(key: &[u8]) -> Result<Keys, String> {
        let raw = parse_key(key)?;
        let aes = derive("aes-256-gcm", &raw);
        Ok(Keys {
            cipher: Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&aes)),
            id_key: derive("chunk-id", &raw),
            check: hex(&derive("check", &raw)),
        })
    }
}

fn parse_key(key: &[u8]) -> Result<[u8; 32], String> {
    if let Ok(raw) = <[u8; 32]>::try_from(key) {
        return Ok(raw);
    }
    let text = std::str::from_utf8(key).map(str::trim).unwrap_or("");
    if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        let mut raw = [0u8; 32];
        for (i, b) in raw.iter_mut().enumerate() {
            *b = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
        }
        return Ok(raw);
    }
    Err(format!(
        "must be 32 bytes or 64 hex digits, not {} bytes",
        key.len()
    ))
}

/// Seals chunk `data` (whose id is `id`) for storage.
pub fn seal(
    data: &[u8],
    id: &str,
    compress: bool,
    keys: Option<&Keys>,
) -> Result<Vec<u8>, SealError> {
    let body = if compress {
        zstd::bulk::compress(data, ZSTD_LEVEL).map_err(SealError::Compress)?
    } else {
        data.to_vec()
    };
    let mut flags = if compress { ZSTD } else { 0 };
    let mut out = Vec::with_capacity(body.len() + 48);
    out.extend_from_slice(MAGIC);
    match keys {
        None => {
            out.push(flags);
            out.extend_from_slice(&body);
        }
        Some(k) => {
            flags |= AES;
            let mut nonce = [0u8; NONCE];
            OsRng.fill_bytes(&mut nonce);
            let sealed = k
                .cipher
                .encrypt(
                    Nonce::from_slice(&nonce),
                    Payload {
                        msg: &body,
                        aad: id.as_bytes(),
                    },
                )
                .map_err(|_| SealError::Decrypt)?;
            out.push(flags);
            out.extend_from_slice(&nonce);
            out.extend_from_slice(&sealed);
        }
    }
    Ok(out)
}

/// Opens a blob stored as chunk `id`: decrypts, decompresses (to at most `max` bytes) and
/// checks that the content has that id.
pub fn open(blob: &[u8], id: &str, keys: Option<&Keys>, max: usize) -> Result<Vec<u8>, SealError> {
    if blob.len() < 5 || &blob[..4] != MAGIC || blob[4] & !(ZSTD | AES) != 0 {
        return Err(SealError::Header);
    }
    let flags = blob[4];
    let rest = &blob[5..];
    let body = if flags & AES != 0 {
        let k = keys.ok_or(SealError::NoKey)?;
        if rest.len() < NONCE {
            return Err(SealError::Header);
        }
        let (nonce, sealed) = rest.split_at(NONCE);
        k.cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: id.as_bytes(),
                },
            )
            .map_err(|_| SealError::Decrypt)?
    } else {
        rest.to_vec()
    };
    let data = if flags & ZSTD != 0 {
        zstd::bulk::decompress(&body, max).map_err(SealError::Decompress)?
    } else {
        body
    };
    if data.len() > max {
        return Err(SealError::TooLong(data.len(), max));
    }
    let encrypted = flags & AES != 0;
    let id_key = if encrypted {
        keys.map(|k| &k.id_key)
    } else {
        None
    };
    if chunk_id(&data, id_key) != id {
        return Err(SealError::Digest);
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data() -> Vec<u8> {
        (0..100_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect()
    }

    #[test]
    fn round_trips_plain_compressed_and_encrypted() {
        let d = data();
        let k = Keys::new(&[3u8; 32]).unwrap();
        for (compress, keys) in [
            (false, None),
            (true, None),
            (true, Some(&k)),
            (false, Some(&k)),
        ] {
            let id = chunk_id(&d, keys.map(|k| &k.id_key));
            let blob = seal(&d, &id, compress, keys).unwrap();
            if compress {
                assert!(blob.len() < d.len() / 4, "compressed to {}", blob.len());
            }
            assert_eq!(open(&blob, &id, keys, d.len()).unwrap(), d);
        }
    }

    #[test]
    fn nonces_differ_and_the_key_is_not_in_the_blob() {
        let k = Keys::new(&[9u8; 32]).unwrap();
        let id = chunk_id(b"x", Some(&k.id_key));
        let a = seal(b"x", &id, false, Some(&k)).unwrap();
        let b = seal(b"x", &id, false, Some(&k)).unwrap();
        assert_ne!(a[5..17], b[5..17]);
        assert!(!a.windows(32).any(|w| w == [9u8; 32]));
    }

    #[test]
    fn wrong_key_missing_key_swapped_and_corrupted_chunks_are_refused() {
        let d = data();
        let k = Keys::new(&[1u8; 32]).unwrap();
        let other = Keys::new(&[2u8; 32]).unwrap();
        assert_ne!(k.check, other.check);
        let id = chunk_id(&d, Some(&k.id_key));
        let blob = seal(&d, &id, true, Some(&k)).unwrap();
        assert!(matches!(
            open(&blob, &id, Some(&other), d.len()),
            Err(SealError::Decrypt)
        ));
        assert!(matches!(
            open(&blob, &id, None, d.len()),
            Err(SealError::NoKey)
        ));
        let other_id = chunk_id(b"other", Some(&k.id_key));
        assert!(matches!(
            open(&blob, &other_id, Some(&k), d.len()),
            Err(SealError::Decrypt)
        ));
        // Unencrypted: a flipped bit is found by the content check.
        let id = chunk_id(&d, None);
        let mut blob = seal(&d, &id, false, None).unwrap();
        blob[100] ^= 1;
        assert!(matches!(
            open(&blob, &id, None, d.len()),
            Err(SealError::Digest)
        ));
        assert!(matches!(
            open(b"junk", &id, None, 10),
            Err(SealError::Header)
        ));
    }

    #[test]
    fn keys_parse_raw_or_hex() {
        let hexkey = "00".repeat(31) + "ff\n";
        assert_eq!(
            Keys::new(hexkey.as_bytes()).unwrap().check,
            Keys::new(&{
                let mut k = [0u8; 32];
                k[31] = 0xff;
                k
            })
            .unwrap()
            .check
        );
        assert!(
            Keys::new(b"short")
                .unwrap_err()
                .contains("32 bytes or 64 hex")
        );
        assert_eq!(format!("{:?}", Keys::new(&[1u8; 32]).unwrap()), "Keys(..)");
    }
}

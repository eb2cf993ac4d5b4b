//! Encryption at rest of the write log's records that carry what clients sent (docs/write-log.md, "Encryption
//! at rest").
//!
//! Request bodies carry passwords, and the forwarded headers may carry credentials (`Authorization`,
//! `Cookie`); the idempotency records hold a SHA-256 of each body, which a dictionary attack turns back into a
//! weak password, and the answer a backend gave. With `--encryption-key-file` the records holding any of these
//! are sealed before they reach the segment files, with XChaCha20-Poly1305: a fresh random 24-byte nonce per
//! record (random nonces of that size do not collide in practice, so no counter has to survive a crash), and
//! the record's delivery id as associated data, so that a sealed body cannot be moved under another delivery.
//!
//! # The key file
//! One key per line, 32 bytes written as 64 hex digits or as base64 (standard alphabet, padding optional);
//! blank lines and lines starting with `#` are ignored. The first key seals new records; every key opens. Each
//! sealed record names its key by a [`KeyId`]: the first 4 bytes of SHA-256 over a fixed label and the key,
//! which identifies a key without revealing it. That is how a key is rotated: add the new key as the first
//! line, restart, and keep the old one below it until the history holds no record it sealed (the start-up log
//! line `write log: records at rest` counts them per key).
//!
//! # Dependency
//! `chacha20poly1305` (RustCrypto), with only its `alloc` feature: an audited, widely used AEAD, constant-time,
//! with SIMD backends; cryptography is not something to write ourselves. Key ids use the `sha2` the idempotency
//! records already use, base64 keys the `base64` crate already in the tree (through the Prometheus exporter).

use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The length of a key, in bytes (XChaCha20-Poly1305's key).
pub const KEY_BYTES: usize = 32;
/// The length of a nonce, in bytes (XChaCha20's extended nonce).
pub const NONCE_BYTES: usize = 24;
/// The length of a key id, in bytes.
pub const KEY_ID_BYTES: usize = 4;
/// What the key id hashes before the key, so that the id is not a plain hash of the key seen elsewhere.
const KEY_ID_LABEL: &[u8] = b"fanout write log key id v1\0";
/// The format of the associated data; changes if what it binds ever changes.
const AAD_VERSION: u8 = 1;

/// Names a key without revealing it: the first [`KEY_ID_BYTES`] bytes of SHA-256 over a fixed label and the key.
/// Shown as 8 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct KeyId(pub [u8; KEY_ID_BYTES]);

impl KeyId {
    /// The id of `key`.
    pub fn of(key: &[u8; KEY_BYTES]) -> Self {
        let digest = Sha256::new().chain_update(KEY_ID_LABEL).chain_update(key).finalize();
        let mut id = [0; KEY_ID_BYTES];
        id.copy_from_slice(&digest[..KEY_ID_BYTES]);
        KeyId(id)
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// A sealed record as stored: the key that sealed it, its nonce, and the ciphertext with its 16-byte tag.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealed {
    /// The key that sealed it.
    pub key: KeyId,
    /// The record's random nonce.
    pub nonce: [u8; NONCE_BYTES],
    /// The encrypted record followed by its authentication tag.
    pub ciphertext: Vec<u8>,
}

impl fmt::Debug for Sealed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealed").field("key", &self.key).field("bytes", &self.ciphertext.len()).finish()
    }
}

/// The cipher refused to seal a message of this many bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a record of {0} bytes cannot be encrypted")]
pub struct SealError(pub usize);

/// Why a sealed record does not open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// No key of the key file has this id.
    #[error("no key with id {0}")]
    UnknownKey(KeyId),
    /// The key is there but the record does not authenticate: it was changed, or moved from another delivery.
    #[error("a record sealed with key {0} does not authenticate (changed, or moved from another record)")]
    Forged(KeyId),
}

/// Why a key file is refused. The messages never show key material.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// The file cannot be read.
    #[error("cannot read it: {0}")]
    Read(#[source] std::io::Error),
    /// The file holds no key.
    #[error("it holds no key (one key per line: 64 hex digits or base64 of 32 bytes)")]
    Empty,
    /// A line is not a key.
    #[error("line {line}: {why}")]
    BadLine {
        /// The line number, from 1.
        line: usize,
        /// What is wrong (never the line itself).
        why: String,
    },
    /// Two lines hold the same key (or two keys share an id, which is as unlikely as a collision of 32 bits).
    #[error("line {line}: the same key (id {id}) is on an earlier line")]
    Duplicate {
        /// The line number of the second one, from 1.
        line: usize,
        /// The key's id.
        id: KeyId,
    },
}

/// The keys of `--encryption-key-file`: the first seals, all open. Never prints its keys.
pub struct Keyring {
    keys: Vec<(KeyId, XChaCha20Poly1305)>,
    path: PathBuf,
    /// The file's permission bits, when group or others have any (`None`: private, or not a file on disk).
    loose_mode: Option<u32>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring").field("path", &self.path).field("ids", &self.ids()).finish()
    }
}

impl Keyring {
    /// Reads and parses the key file at `path` (see the module doc for its format), and notes its permission
    /// bits (see [`Keyring::loose_mode`]).
    ///
    /// # Errors
    /// [`KeyFileError`] when the file cannot be read or a line is not a key.
    pub fn load(path: &Path) -> Result<Self, KeyFileError> {
        use std::os::unix::fs::PermissionsExt;
        let text = std::fs::read_to_string(path).map_err(KeyFileError::Read)?;
        let mode = std::fs::metadata(path).map_err(KeyFileError::Read)?.permissions().mode() & 0o777;
        let mut ring = Self::from_keys(parse_keys(&text)?, path)?;
        ring.loose_mode = (mode & 0o077 != 0).then_some(mode);
        Ok(ring)
    }

    /// A key ring of `keys` (the first seals), read from `path` (for messages).
    ///
    /// # Errors
    /// [`KeyFileError::Empty`] for no key, [`KeyFileError::Duplicate`] when two keys share an id.
    pub fn from_keys(keys: Vec<[u8; KEY_BYTES]>, path: &Path) -> Result<Self, KeyFileError> {
        if keys.is_empty() {
            return Err(KeyFileError::Empty);
        }
        let mut ring = Vec::with_capacity(keys.len());
        for (n, key) in keys.iter().enumerate() {
            let id = KeyId::of(key);
            if ring.iter().any(|(other, _)| *other == id) {
                return Err(KeyFileError::Duplicate { line: n + 1, id });
            }
            ring.push((id, XChaCha20Poly1305::new(&(*key).into())));
        }
        Ok(Keyring { keys: ring, path: path.to_owned(), loose_mode: None })
    }

    /// The id of the key that seals new records.
    pub fn current(&self) -> KeyId {
        self.keys[0].0
    }

    /// The ids of every key, in file order.
    pub fn ids(&self) -> Vec<KeyId> {
        self.keys.iter().map(|(id, _)| *id).collect()
    }

    /// The key file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The key file's permission bits (`0o644` ...) when group or others may read or write it: the caller warns.
    pub fn loose_mode(&self) -> Option<u32> {
        self.loose_mode
    }

    /// Seals `plaintext` with the current key and a fresh random nonce, bound to delivery `id` (0 for a record
    /// tied to no delivery).
    ///
    /// # Errors
    /// [`SealError`] when the cipher refuses the message (longer than XChaCha20's 256 GiB per nonce: never for
    /// a record, which is at most 16 MiB).
    pub fn seal(&self, id: u128, plaintext: &[u8]) -> Result<Sealed, SealError> {
        let (key, cipher) = &self.keys[0];
        let mut nonce = [0; NONCE_BYTES];
        // `rand::rng()` is a CSPRNG seeded from the operating system (ChaCha12, reseeded periodically).
        rand::rng().fill_bytes(&mut nonce);
        let ciphertext = cipher
            .encrypt(&XNonce::from(nonce), Payload { msg: plaintext, aad: &aad(id) })
            .map_err(|_| SealError(plaintext.len()))?;
        Ok(Sealed { key: *key, nonce, ciphertext })
    }

    /// The plaintext of `sealed`, which must have been sealed for delivery `id`.
    ///
    /// # Errors
    /// [`OpenError::UnknownKey`] when no key has the record's key id, [`OpenError::Forged`] when it does not
    /// authenticate.
    pub fn open(&self, id: u128, sealed: &Sealed) -> Result<Vec<u8>, OpenError> {
        let (_, cipher) = self.keys.iter().find(|(k, _)| *k == sealed.key).ok_or(OpenError::UnknownKey(sealed.key))?;
        cipher
            .decrypt(&XNonce::from(sealed.nonce), Payload { msg: &sealed.ciphertext, aad: &aad(id) })
            .map_err(|_| OpenError::Forged(sealed.key))
    }
}

/// The associated data of a record of delivery `id`: a format byte, then the id (16 bytes, little-endian).
fn aad(id: u128) -> [u8; 17] {
    let mut aad = [0; 17];
    aad[0] = AAD_VERSION;
    aad[1..].copy_from_slice(&id.to_le_bytes());
    aad
}

/// The keys of a key file's text, in order (see the module doc for the format).
///
/// # Errors
/// [`KeyFileError::BadLine`] for a line that is not 32 bytes in hex or base64, [`KeyFileError::Empty`] for no
/// key at all.
pub fn parse_keys(text: &str) -> Result<Vec<[u8; KEY_BYTES]>, KeyFileError> {
    let mut keys = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        keys.push(parse_key(line).map_err(|why| KeyFileError::BadLine { line: n + 1, why })?);
    }
    if keys.is_empty() {
        return Err(KeyFileError::Empty);
    }
    Ok(keys)
}

/// One key: 64 hex digits, or base64 of 32 bytes. The error never quotes the line.
fn parse_key(line: &str) -> Result<[u8; KEY_BYTES], String> {
    if line.len() == 2 * KEY_BYTES && line.bytes().all(|b| b.is_ascii_hexdigit()) {
        let mut key = [0; KEY_BYTES];
        for (byte, pair) in key.iter_mut().zip(line.as_bytes().chunks(2)) {
            // Two ASCII hex digits: always valid UTF-8 and a valid byte.
            *byte = u8::from_str_radix(std::str::from_utf8(pair).unwrap_or("00"), 16).unwrap_or(0);
        }
        return Ok(key);
    }
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    let bytes = engine.decode(line).map_err(|_| {
        format!("not a key: expected 64 hex digits or base64 of {KEY_BYTES} bytes ({} characters)", line.len())
    })?;
    <[u8; KEY_BYTES]>::try_from(bytes.as_slice()).map_err(|_| {
        format!("a key must be {KEY_BYTES} bytes; this base64 decodes to {} (e.g. `openssl rand -hex 32`)", bytes.len())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    fn key(n: u8) -> [u8; KEY_BYTES] {
        [n; KEY_BYTES]
    }

    fn ring(keys: &[[u8; KEY_BYTES]]) -> Keyring {
        Keyring::from_keys(keys.to_vec(), Path::new("keys")).expect("a key ring")
    }

    #[test]
    fn hex_and_base64_lines_parse_with_comments_and_blank_lines() {
        let expected: [u8; KEY_BYTES] = std::array::from_fn(|i| i as u8);
        let b64 = base64::engine::general_purpose::STANDARD.encode(expected);
        let unpadded = b64.trim_end_matches('=');
        let text = format!("# new key first\n{HEX}\n\n  {b64}  \n{unpadded}\n{}\n", HEX.to_uppercase());
        assert_eq!(parse_keys(&text).expect("parses"), vec![expected; 4]);
    }

    #[test]
    fn bad_key_files_are_refused_with_the_line_and_never_the_key() {
        let short = base64::engine::general_purpose::STANDARD.encode([7u8; 16]);
        let cases = [
            ("", "holds no key"),
            ("# only a comment\n\n", "holds no key"),
            (&HEX[..62], "line 1: not a key"),
            (&format!("{HEX}\n{short}"), "line 2: a key must be 32 bytes; this base64 decodes to 16"),
            (&format!("{HEX}00"), "line 1: not a key"),
            ("hunter2-is-not-a-key!", "line 1: not a key"),
        ];
        for (text, needle) in cases {
            let err = parse_keys(text).expect_err(text).to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
            assert!(!err.contains("hunter2") && !err.contains(&short) && !err.contains(&HEX[..62]), "{err}");
        }
        let err = Keyring::from_keys(vec![key(1), key(2), key(1)], Path::new("k")).expect_err("duplicate");
        assert!(err.to_string().starts_with("line 3: the same key"), "{err}");
    }

    #[test]
    fn key_ids_are_stable_distinct_and_not_the_key() {
        let id = KeyId::of(&key(1));
        assert_eq!(id, KeyId::of(&key(1)));
        assert_ne!(id, KeyId::of(&key(2)));
        assert_eq!(id.to_string().len(), 8);
        assert_ne!(id.0, key(1)[..KEY_ID_BYTES]);
    }

    #[test]
    fn sealed_records_open_with_any_key_of_the_ring_and_only_for_their_delivery() {
        let old = ring(&[key(1)]);
        let sealed = old.seal(42, b"username=alice&password=hunter2").expect("seals");
        assert_eq!(sealed.key, KeyId::of(&key(1)));
        assert!(!sealed.ciphertext.windows(7).any(|w| w == b"hunter2"));
        // Rotated: the new key seals, the old one still opens.
        let rotated = ring(&[key(2), key(1)]);
        assert_eq!(rotated.open(42, &sealed).expect("opens"), b"username=alice&password=hunter2");
        assert_eq!(rotated.seal(42, b"x").expect("seals").key, KeyId::of(&key(2)));
        // Under another delivery, changed, or without its key: refused.
        assert_eq!(rotated.open(43, &sealed), Err(OpenError::Forged(sealed.key)));
        let mut changed = sealed.clone();
        changed.ciphertext[0] ^= 1;
        assert_eq!(rotated.open(42, &changed), Err(OpenError::Forged(sealed.key)));
        assert_eq!(ring(&[key(2)]).open(42, &sealed), Err(OpenError::UnknownKey(sealed.key)));
        // A fresh nonce every time: the same record never seals to the same bytes.
        assert_ne!(old.seal(42, b"same").expect("seals").nonce, old.seal(42, b"same").expect("seals").nonce);
    }

    #[test]
    fn a_group_or_world_readable_key_file_is_noted() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("fanout-keyfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("keys");
        std::fs::write(&path, HEX).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert_eq!(Keyring::load(&path).expect("loads").loose_mode(), Some(0o644));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert_eq!(Keyring::load(&path).expect("loads").loose_mode(), None);
        let missing = Keyring::load(&dir.join("missing")).expect_err("missing");
        assert!(matches!(missing, KeyFileError::Read(_)), "{missing}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

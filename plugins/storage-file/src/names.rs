//! Safe file names for arbitrary ids.
//!
//! An id (block id, transaction id or metadata key: any UTF-8 text, including `/`, `\`, NUL, `..`
//! and non-ASCII) becomes a name made only of `[0-9a-fx]` or `[0-9a-fh]`:
//! - up to [`MAX_INLINE_BYTES`] bytes: `x` + lowercase hex of the bytes (reversible, and the same
//!   on case-insensitive file systems);
//! - longer: `h` + hex of the SHA-256 of the bytes; the file or directory then stores the id itself,
//!   so listings can recover it.
//!
//! No name is empty, `.`, `..`, contains a separator, or exceeds 255 bytes, so no id can reach
//! outside the directory it is stored in.

use sha2::{Digest, Sha256};

/// Ids up to this many bytes are stored as hex (`1 + 2 * 120 = 241` bytes of name).
pub const MAX_INLINE_BYTES: usize = 120;

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        // Writing to a String cannot fail.
        let _ = write!(out, "{b:02x}");
    }
    out
}

fn unhex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

/// The file name of an id.
pub fn encode(id: &str) -> String {
    if id.len() <= MAX_INLINE_BYTES {
        format!("x{}", hex(id.as_bytes()))
    } else {
        format!("h{}", hex(&Sha256::digest(id.as_bytes())))
    }
}

/// What a file name says about its id.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// The id itself.
    Id(String),
    /// A hashed name: the id is stored inside the file or directory.
    Hashed,
    /// Not a name this module produces (a stray file).
    Foreign,
}

/// Decodes a file name made by [`encode`].
pub fn decode(name: &str) -> Decoded {
    if let Some(hexed) = name.strip_prefix('x') {
        let bytes = hexed.as_bytes();
        if bytes.is_empty() || bytes.len() % 2 != 0 {
            return Decoded::Foreign;
        }
        let mut out = Vec::with_capacity(bytes.len() / 2);
        for pair in bytes.chunks_exact(2) {
            let (Some(&hi), Some(&lo)) = (pair.first(), pair.get(1)) else {
                return Decoded::Foreign;
            };
            match (unhex_digit(hi), unhex_digit(lo)) {
                (Some(hi), Some(lo)) => out.push(hi << 4 | lo),
                _ => return Decoded::Foreign,
            }
        }
        match String::from_utf8(out) {
            Ok(id) => Decoded::Id(id),
            Err(_) => Decoded::Foreign,
        }
    } else if name.len() == 65 && name.starts_with('h') && name.bytes().skip(1).all(|c| unhex_digit(c).is_some()) {
        Decoded::Hashed
    } else {
        Decoded::Foreign
    }
}

/// The hex prefix that every inline name of an id starting with `prefix` starts with (after `x`).
pub fn inline_prefix(prefix: &str) -> String {
    format!("x{}", hex(prefix.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_safe_and_reversible() {
        let long = "é".repeat(128);
        let ids = ["../../etc/passwd", "a/b", "a\\b", "nul\0byte", "..", ".", "日本語", long.as_str(), "CON"];
        for id in ids {
            let name = encode(id);
            assert!(name.len() <= 255, "{id:?}");
            assert!(name.bytes().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase() || c == b'x' || c == b'h'));
            assert_ne!(name, ".");
            assert_ne!(name, "..");
            match decode(&name) {
                Decoded::Id(back) => assert_eq!(back, id),
                Decoded::Hashed => assert!(id.len() > MAX_INLINE_BYTES),
                Decoded::Foreign => panic!("{id:?} decodes as foreign"),
            }
        }
        assert_eq!(decode("x"), Decoded::Foreign);
        assert_eq!(decode("xg0"), Decoded::Foreign);
        assert_eq!(decode("xff"), Decoded::Foreign);
        assert_eq!(decode(".tmp"), Decoded::Foreign);
    }

    #[test]
    fn inline_prefix_matches_names() {
        assert!(encode("promise/abc").starts_with(&inline_prefix("promise/")));
        assert!(!encode("promisf").starts_with(&inline_prefix("promise")));
    }
}

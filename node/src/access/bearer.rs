//! Bearer tokens as clients hold them, and the hash a node keeps instead.
//!
//! A token is `cw1_<id>_<secret>`: `id` is 8 random bytes in hex (16
//! characters, public: it names the token in lists, logs and the audit
//! feed) and `secret` 32 random bytes in hex (64 characters). A node keeps
//! only SHA-256 of the id and secret under a domain tag; the secret has 256
//! bits of entropy, so the hash needs no stretching, and a leaked tokens
//! file does not give tokens away. Checking a presented token looks the id
//! up and compares the hashes in constant time.

use std::fmt;
use std::fs;
use std::io::Read;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// What every token starts with (the version of this format).
pub const TOKEN_PREFIX: &str = "cw1_";
/// Random bytes of a token id.
pub const ID_BYTES: usize = 8;
/// Random bytes of a token secret.
pub const SECRET_BYTES: usize = 32;
/// Characters of an encoded token.
pub const TOKEN_CHARS: usize = TOKEN_PREFIX.len() + 2 * ID_BYTES + 1 + 2 * SECRET_BYTES;
/// Domain tag of token hashes.
const HASH_TAG: &[u8] = b"causeway-token/v1\0";
/// How a stored hash starts.
pub const HASH_PREFIX: &str = "sha256:";

/// A token's public id: 16 lowercase hex characters.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TokenId(String);

impl TokenId {
    /// Checks that `id` is 16 lowercase hex characters.
    pub fn parse(id: &str) -> Option<TokenId> {
        let ok = id.len() == 2 * ID_BYTES && id.bytes().all(is_lower_hex);
        ok.then(|| TokenId(id.to_string()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TokenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A token as a client presents it. Its `Debug` form hides the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct BearerToken {
    id: TokenId,
    secret: String,
}

impl fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BearerToken({}, ..)", self.id)
    }
}

/// The SHA-256 a node keeps of a token.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TokenHash([u8; 32]);

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenHash({})", self)
    }
}

impl BearerToken {
    /// A new token from the operating system's random source.
    pub fn generate() -> std::io::Result<BearerToken> {
        let mut bytes = [0u8; ID_BYTES + SECRET_BYTES];
        fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
        Ok(BearerToken {
            id: TokenId(hex(&bytes[..ID_BYTES])),
            secret: hex(&bytes[ID_BYTES..]),
        })
    }

    /// Reads a presented token; `None` if it is not of this format.
    pub fn parse(text: &str) -> Option<BearerToken> {
        if text.len() != TOKEN_CHARS {
            return None;
        }
        let rest = text.strip_prefix(TOKEN_PREFIX)?;
        let id = TokenId::parse(rest.get(..2 * ID_BYTES)?)?;
        let secret = rest.get(2 * ID_BYTES..)?.strip_prefix('_')?;
        if !secret.bytes().all(is_lower_hex) {
            return None;
        }
        Some(BearerToken {
            id,
            secret: secret.to_string(),
        })
    }

    /// The token's public id.
    pub fn id(&self) -> &TokenId {
        &self.id
    }

    /// The hash a node keeps.
    pub fn hash(&self) -> TokenHash {
        TokenHash::of(self.id.as_str(), self.secret.as_bytes())
    }

    /// The token as the client sends it (`Authorization: Bearer ...`).
    pub fn reveal(&self) -> String {
        format!("{TOKEN_PREFIX}{}_{}", self.id, self.secret)
    }
}

impl TokenHash {
    /// The hash of a token with this id and secret. Tokens from the settings
    /// file, which have no id, hash with an empty one.
    pub fn of(id: &str, secret: &[u8]) -> TokenHash {
        let digest = Sha256::new()
            .chain_update(HASH_TAG)
            .chain_update(id.as_bytes())
            .chain_update(b"\0")
            .chain_update(secret)
            .finalize();
        TokenHash(digest.into())
    }

    /// Reads `sha256:<64 hex>`.
    pub fn parse(text: &str) -> Option<TokenHash> {
        let hex_digits = text.strip_prefix(HASH_PREFIX)?;
        if hex_digits.len() != 64 {
            return None;
        }
        let mut bytes = [0u8; 32];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(hex_digits.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(TokenHash(bytes))
    }

    /// Whether two hashes are equal, in time that does not depend on where
    /// they differ.
    pub fn matches(&self, other: &TokenHash) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl fmt::Display for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{HASH_PREFIX}{}", hex(&self.0))
    }
}

fn is_lower_hex(b: u8) -> bool {
    b.is_ascii_digit() || (b'a'..=b'f').contains(&b)
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_round_trips_and_its_hash_is_checked() -> std::io::Result<()> {
        let token = BearerToken::generate()?;
        let text = token.reveal();
        assert_eq!(text.len(), TOKEN_CHARS);
        assert_eq!(BearerToken::parse(&text), Some(token.clone()));
        let stored = TokenHash::parse(&token.hash().to_string());
        assert!(stored.is_some_and(|h| h.matches(&token.hash())));
        // Another secret under the same id hashes differently.
        let mut forged = text.clone();
        forged.pop();
        forged.push(if text.ends_with('0') { '1' } else { '0' });
        let forged = BearerToken::parse(&forged).map(|t| t.hash());
        assert!(forged.is_some_and(|h| !h.matches(&token.hash())));
        Ok(())
    }

    #[test]
    fn malformed_tokens_are_not_read() {
        let good = format!("{TOKEN_PREFIX}{}_{}", "0".repeat(16), "a".repeat(64));
        assert!(BearerToken::parse(&good).is_some());
        for bad in [
            "",
            "cw1_",
            &good[..good.len() - 1],
            &format!("{good}0"),
            &good.replace("cw1_", "cw2_"),
            &good.replacen('a', "A", 1),
            &good.replacen('_', "-", 2),
            &format!("{}é", &good[..good.len() - 2]),
            &format!("cw1_{}é{}", "0".repeat(15), &good[21..]),
        ] {
            assert!(BearerToken::parse(bad).is_none(), "{bad:?}");
        }
        assert!(TokenHash::parse("sha256:zz").is_none());
        assert!(TokenHash::parse(&format!("md5:{}", "0".repeat(64))).is_none());
    }
}

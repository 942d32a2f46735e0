//! HMAC signatures for cookies and CSRF tokens.
//!
//! Voter identity and CSRF tokens are stateless on purpose: any app node can
//! check them with the shared key, so two nodes never need to agree through
//! one node's memory.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Signs and checks with the cookie key.
#[derive(Clone)]
pub struct Signer {
    key: Vec<u8>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer(redacted)")
    }
}

/// Purposes keep a signature made for one use from being accepted for another.
#[derive(Debug, Clone, Copy)]
pub enum Purpose {
    /// The voter cookie.
    Voter,
    /// The public vote form's CSRF token, bound to the voter.
    VoteCsrf,
    /// The admin login form's CSRF token, bound to the login cookie.
    LoginCsrf,
    /// The admin forms' CSRF token, bound to the session.
    AdminCsrf,
}

impl Purpose {
    fn tag(self) -> &'static [u8] {
        match self {
            Purpose::Voter => b"voter\0",
            Purpose::VoteCsrf => b"vote-csrf\0",
            Purpose::LoginCsrf => b"login-csrf\0",
            Purpose::AdminCsrf => b"admin-csrf\0",
        }
    }
}

impl Signer {
    /// A signer with `key` (at least 32 bytes, checked by the configuration).
    pub fn new(key: &[u8]) -> Self {
        Self { key: key.to_vec() }
    }

    fn mac(&self, purpose: Purpose, data: &str) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC accepts any key length");
        mac.update(purpose.tag());
        mac.update(data.as_bytes());
        mac
    }

    /// The signature of `data` for `purpose`, base64url.
    pub fn sign(&self, purpose: Purpose, data: &str) -> String {
        URL_SAFE_NO_PAD.encode(self.mac(purpose, data).finalize().into_bytes())
    }

    /// Checks `signature` in constant time.
    pub fn verify(&self, purpose: Purpose, data: &str, signature: &str) -> bool {
        let Ok(bytes) = URL_SAFE_NO_PAD.decode(signature) else {
            return false;
        };
        self.mac(purpose, data).verify_slice(&bytes).is_ok()
    }

    /// `data.signature`: a value that can travel in a cookie.
    pub fn seal(&self, purpose: Purpose, data: &str) -> String {
        format!("{data}.{}", self.sign(purpose, data))
    }

    /// The data of a sealed value, when its signature holds.
    pub fn open<'a>(&self, purpose: Purpose, sealed: &'a str) -> Option<&'a str> {
        let (data, signature) = sealed.rsplit_once('.')?;
        self.verify(purpose, data, signature).then_some(data)
    }
}

/// A random token of 16 bytes, base64url (22 characters).
pub fn random_token() -> String {
    let bytes: [u8; 16] = rand::random();
    URL_SAFE_NO_PAD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer() -> Signer {
        Signer::new(&[7u8; 32])
    }

    #[test]
    fn sealed_value_opens_only_with_its_purpose_and_key() {
        let sealed = signer().seal(Purpose::Voter, "abc");
        assert_eq!(signer().open(Purpose::Voter, &sealed), Some("abc"));
        assert_eq!(signer().open(Purpose::VoteCsrf, &sealed), None);
        assert_eq!(Signer::new(&[8u8; 32]).open(Purpose::Voter, &sealed), None);
    }

    #[test]
    fn tampered_values_are_refused() {
        let sealed = signer().seal(Purpose::Voter, "abc");
        let forged = sealed.replacen("abc", "abd", 1);
        assert_eq!(signer().open(Purpose::Voter, &forged), None);
        assert_eq!(signer().open(Purpose::Voter, "abc"), None);
        assert!(!signer().verify(Purpose::Voter, "abc", "!!not base64!!"));
    }

    #[test]
    fn random_tokens_differ() {
        let (a, b) = (random_token(), random_token());
        assert_eq!(a.len(), 22);
        assert_ne!(a, b);
    }
}

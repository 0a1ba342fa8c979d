//! The one type that holds a secret: redacted when printed, zeroized when dropped.

use std::fmt;

use zeroize::Zeroizing;

/// A secret string (an app password or token) that never prints and is wiped on drop.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Zeroizing<String>);

impl Secret {
    /// Wraps a secret value; the caller's copy should be dropped promptly.
    pub fn new(value: String) -> Self {
        Self(Zeroizing::new(value))
    }

    /// Returns the secret itself, for the few places that must send or store it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// A fresh random token (24 bytes from the system's secure source, base64url).
    pub fn random() -> Self {
        use base64::Engine as _;
        let mut bytes = zeroize::Zeroizing::new([0u8; 24]);
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), bytes.as_mut())
            .expect("the system random source is available");
        Self::new(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes.as_ref()))
    }

    /// True when the secret holds no characters.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A secret that never changes is its own source (the demo, tests).
impl super::SecretSource for Secret {
    fn read(&self) -> Result<Option<Secret>, super::StoreError> {
        Ok(Some(self.clone()))
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self::new(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_never_show_the_value() {
        let secret = Secret::new("hunter2-app-password".to_owned());
        assert!(!format!("{secret:?}").contains("hunter2"));
        assert!(!format!("{secret}").contains("hunter2"));
        assert!(!format!("{:?}", Some(&secret)).contains("hunter2"));
        assert_eq!(secret.expose(), "hunter2-app-password");
    }
}

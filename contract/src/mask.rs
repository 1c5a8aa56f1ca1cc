//! Token masking: where a secret must be shown at all, it is shown as `ghp_****ghij`.

use std::borrow::Cow;

/// Masks a token as its first four characters, `****`, and its last four.
///
/// Tokens of twelve characters or fewer would reveal too much that way and are
/// masked completely.
pub fn mask_token(token: &str) -> String {
    let chars: Vec<char> = token.chars().collect();
    if chars.len() <= 12 {
        return "****".to_owned();
    }
    let head: String = chars[..4].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}****{tail}")
}

/// Replaces every known secret in a text with its masked form, and hides the password
/// of any `scheme://user:password@` URL.
///
/// Every line that leaves the executor (output list, logs, errors) goes through one.
///
/// ```
/// use repobox_contract::Masker;
///
/// let mut m = Masker::new();
/// m.add("ghp_1234567890abcdefghij");
/// // A known secret keeps just enough to be recognised; a short one would be hidden whole.
/// assert_eq!(m.mask("token ghp_1234567890abcdefghij refused"), "token ghp_****ghij refused");
/// // A URL's password is hidden even when it was never added.
/// assert_eq!(
///     m.mask("fatal: https://oauth2:hunter2@git.example.com/a.git"),
///     "fatal: https://oauth2:****@git.example.com/a.git"
/// );
/// ```
#[derive(Clone, Default)]
pub struct Masker {
    secrets: Vec<(String, String)>,
}

impl std::fmt::Debug for Masker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Masker")
            .field("secrets", &self.secrets.len())
            .finish()
    }
}

impl Masker {
    /// A masker that hides only URL passwords until secrets are [`add`](Self::add)ed.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a secret to hide. Empty strings are ignored (they would match everywhere).
    pub fn add(&mut self, secret: &str) {
        if secret.is_empty() || self.secrets.iter().any(|(s, _)| s == secret) {
            return;
        }
        self.secrets.push((secret.to_owned(), mask_token(secret)));
        // Longest first, so a secret that contains another is replaced whole.
        self.secrets
            .sort_by_key(|(secret, _)| std::cmp::Reverse(secret.len()));
    }

    /// The text with every secret masked; borrowed when there was nothing to hide.
    pub fn mask<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let mut out = Cow::Borrowed(text);
        for (secret, masked) in &self.secrets {
            if out.contains(secret.as_str()) {
                out = Cow::Owned(out.replace(secret.as_str(), masked));
            }
        }
        match mask_url_passwords(&out) {
            Cow::Borrowed(_) => out,
            Cow::Owned(s) => Cow::Owned(s),
        }
    }
}

/// Hides the password part of `scheme://user:password@host` occurrences.
fn mask_url_passwords(text: &str) -> Cow<'_, str> {
    if !text.contains("://") {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut changed = false;
    while let Some(pos) = rest.find("://") {
        let (before, after) = rest.split_at(pos + 3);
        out.push_str(before);
        // The authority ends at the first '/', whitespace, or end of text.
        let end = after
            .find(|c: char| c == '/' || c.is_whitespace())
            .unwrap_or(after.len());
        let authority = &after[..end];
        match authority.rfind('@') {
            Some(at) if authority[..at].contains(':') => {
                let colon = authority[..at].find(':').unwrap_or(at);
                out.push_str(&authority[..colon]);
                out.push_str(":****");
                out.push_str(&authority[at..]);
                changed = true;
            }
            _ => out.push_str(authority),
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    if changed {
        Cow::Owned(out)
    } else {
        Cow::Borrowed(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn masks_like_the_original_design() {
        assert_eq!(mask_token("ghp_1234567890abcdefghij"), "ghp_****ghij");
        assert_eq!(mask_token("glpat-abcdefghijklmnop"), "glpa****mnop");
    }

    #[test]
    fn short_tokens_are_masked_completely() {
        assert_eq!(mask_token(""), "****");
        assert_eq!(mask_token("secret"), "****");
        assert_eq!(mask_token("123456789012"), "****");
    }

    #[test]
    fn masker_replaces_every_occurrence() {
        let mut m = Masker::new();
        m.add("ghp_1234567890abcdefghij");
        let line = "token=ghp_1234567890abcdefghij again ghp_1234567890abcdefghij";
        assert_eq!(m.mask(line), "token=ghp_****ghij again ghp_****ghij");
        assert!(matches!(m.mask("nothing here"), Cow::Borrowed(_)));
    }

    #[test]
    fn masker_hides_url_passwords() {
        let m = Masker::new();
        assert_eq!(
            m.mask("fatal: https://oauth2:hunter2@github.com/a/b.git not found"),
            "fatal: https://oauth2:****@github.com/a/b.git not found"
        );
        assert_eq!(
            m.mask("redis://:pw@127.0.0.1:6379/0"),
            "redis://:****@127.0.0.1:6379/0"
        );
        assert_eq!(
            m.mask("https://github.com/a/b.git"),
            "https://github.com/a/b.git"
        );
        assert_eq!(m.mask("user@host: no scheme"), "user@host: no scheme");
    }

    #[test]
    fn empty_secret_is_ignored() {
        let mut m = Masker::new();
        m.add("");
        assert_eq!(m.mask("abc"), "abc");
    }

    proptest! {
        #[test]
        fn a_masked_text_never_contains_the_secret(
            secret in "[A-Za-z0-9_]{13,40}",
            before in ".{0,40}",
            after in ".{0,40}",
        ) {
            let mut m = Masker::new();
            m.add(&secret);
            let text = format!("{before}{secret}{after}");
            let masked = m.mask(&text);
            prop_assert!(!masked.contains(&secret));
        }

        #[test]
        fn masking_never_panics(text in "\\PC{0,200}") {
            let mut m = Masker::new();
            m.add("ghp_1234567890abcdefghij");
            let _ = m.mask(&text);
        }
    }
}

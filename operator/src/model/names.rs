//! Deterministic Kubernetes names and label values derived from Repobox identifiers.
//!
//! Job ids and user ids come from the web app and are not under the operator's control, while
//! Kubernetes restricts object names and label values. The functions here map any string to a
//! valid name or label value such that:
//!
//! * the mapping is deterministic (the same id always gives the same name, so intake is
//!   idempotent: creating the RepoboxJob twice hits `AlreadyExists` instead of duplicating work);
//! * ids that are already valid are used unchanged (readable `kubectl get` output);
//! * two distinct ids never map to the same name. Every changed id gets a `-` + 10 hex
//!   characters suffix taken from the SHA-256 of the *original* id, and a valid id that happens
//!   to end the same way (`-` + 10 lowercase hex characters) is treated as "needs changing" too,
//!   so an unchanged id can never be mistaken for a hashed one. Two changed ids could only
//!   collide if they share the sanitised prefix *and* 40 bits of SHA-256.
//!
//! Beside them, the checks the settings need: DNS-1123 subdomains, Secret keys, qualified names
//! (annotation keys) and Kubernetes quantities.

use sha2::{Digest, Sha256};

/// Maximum length of a DNS-1123 label and of a label value.
pub const MAX_LABEL_LEN: usize = 63;

/// Number of hex characters of the SHA-256 suffix appended to changed ids.
const HASH_LEN: usize = 10;

/// Longest sanitised prefix kept before `-<hash>`, so the result fits in 63 characters.
const MAX_PREFIX_LEN: usize = MAX_LABEL_LEN - HASH_LEN - 1;

/// Name used as the prefix when nothing of the id survives sanitising (e.g. an empty id).
const EMPTY_NAME_PREFIX: &str = "job";

/// Label-value prefix when nothing of the value survives sanitising.
const EMPTY_LABEL_PREFIX: &str = "id";

/// The name of the RepoboxJob and of its batch/v1 Job for a Repobox job id.
///
/// The result is a DNS-1123 label (`[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63 characters):
/// Job names must be labels (not just subdomains) because the Job controller copies the name into
/// the `batch.kubernetes.io/job-name` label of its pods. A valid id is returned unchanged;
/// anything else is lowercased, every other character replaced with `-`, dashes collapsed and
/// trimmed, truncated, and suffixed with `-` + 10 hex characters of the id's SHA-256 (so `ABC`
/// and `abc` get different names).
///
/// ```
/// use repobox_operator::model::names::object_name;
///
/// assert_eq!(object_name("job-42"), "job-42");
/// let odd = object_name("Job_42");
/// assert!(odd.starts_with("job-42-") && odd.len() == "job-42-".len() + 10);
/// assert_ne!(object_name("ABC"), object_name("abc"));
/// ```
pub fn object_name(job_id: &str) -> String {
    if is_dns1123_label(job_id) && !has_hash_suffix(job_id) {
        return job_id.to_owned();
    }
    let mut prefix = String::with_capacity(job_id.len().min(MAX_PREFIX_LEN));
    for c in job_id.chars() {
        let c = c.to_ascii_lowercase();
        let c = if c.is_ascii_lowercase() || c.is_ascii_digit() {
            c
        } else {
            '-'
        };
        if c == '-' && (prefix.is_empty() || prefix.ends_with('-')) {
            continue;
        }
        prefix.push(c);
    }
    finish(
        prefix,
        |c| c.is_ascii_alphanumeric(),
        EMPTY_NAME_PREFIX,
        job_id,
    )
}

/// A valid Kubernetes label value for an arbitrary string (used for job and user ids in labels).
///
/// Label values are at most 63 characters of `[A-Za-z0-9._-]`, beginning and ending with an
/// alphanumeric character, or empty. A valid value is returned unchanged (the empty string stays
/// empty); anything else has invalid characters replaced with `-`, non-alphanumeric characters
/// trimmed from both ends, is truncated, and gets `-` + 10 hex characters of the SHA-256 of the
/// original string. Case is preserved: label values are case-sensitive.
pub fn label_value(s: &str) -> String {
    if is_label_value(s) && !has_hash_suffix(s) {
        return s.to_owned();
    }
    let mut prefix = String::with_capacity(s.len().min(MAX_PREFIX_LEN));
    for c in s.chars() {
        let c = if c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-' {
            c
        } else {
            '-'
        };
        if prefix.is_empty() && !c.is_ascii_alphanumeric() {
            continue;
        }
        prefix.push(c);
    }
    finish(prefix, |c| c.is_ascii_alphanumeric(), EMPTY_LABEL_PREFIX, s)
}

/// Truncates `prefix` (ASCII only by construction), trims trailing characters that may not end
/// a name, and appends the hash of `original`.
fn finish(
    mut prefix: String,
    may_end: impl Fn(char) -> bool,
    empty: &str,
    original: &str,
) -> String {
    prefix.truncate(MAX_PREFIX_LEN);
    while prefix.chars().last().is_some_and(|c| !may_end(c)) {
        prefix.pop();
    }
    if prefix.is_empty() {
        prefix.push_str(empty);
    }
    format!("{prefix}-{}", short_hash(original))
}

/// The first 10 hex characters of the SHA-256 of `s`.
fn short_hash(s: &str) -> String {
    let digest = Sha256::digest(s.as_bytes());
    let mut hex = hex::encode(digest);
    hex.truncate(HASH_LEN);
    hex
}

/// True when `s` ends with `-` followed by 10 lowercase hex characters: the shape of a hashed
/// name. Such ids are re-hashed even when valid, so that they cannot collide with a hashed name.
fn has_hash_suffix(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() > HASH_LEN
        && b[b.len() - HASH_LEN - 1] == b'-'
        && b[b.len() - HASH_LEN..]
            .iter()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
}

/// True when `s` is an RFC 1123 label: 1–63 characters of `[a-z0-9-]`, alphanumeric at both ends.
pub fn is_dns1123_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_LABEL_LEN
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// True when `s` is a valid label value: empty, or 1–63 characters of `[A-Za-z0-9._-]` with an
/// alphanumeric first and last character.
pub fn is_label_value(s: &str) -> bool {
    let b = s.as_bytes();
    if b.is_empty() {
        return true;
    }
    b.len() <= MAX_LABEL_LEN
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

/// A repository URL fit for display: the userinfo (`user:password@`), query string and fragment
/// are removed, because a clone URL may embed an access token in any of them
/// (`https://oauth2:TOKEN@host/…`, `?private_token=…`). Only the scheme, host, port and path
/// remain. Strings without a scheme are treated the same way (`user@host:path` → `host:path`).
pub fn display_repo(url: &str) -> String {
    repobox_contract::urls::sanitize_url(url)
}

/// A Kubernetes qualified name (annotation and label keys): an optional DNS subdomain prefix
/// and `/`, then 1–63 characters of `[A-Za-z0-9._-]`, alphanumeric at both ends.
pub fn is_qualified_name(key: &str) -> bool {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    let b = name.as_bytes();
    prefix.is_none_or(is_dns1123_subdomain)
        && !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

/// The numeric value of a Kubernetes quantity (`<sign><number><suffix>`, suffix one of the
/// binary `Ki Mi Gi Ti Pi Ei`, decimal `m k M G T P E` or none, or an exponent `e<n>`/`E<n>`),
/// or `None` when it is not one. Approximate (f64): used for validation and comparisons only; the
/// original string is what goes into the Job.
pub fn parse_quantity(s: &str) -> Option<f64> {
    let (sign, rest) = match s.as_bytes().first()? {
        b'+' => (1.0, &s[1..]),
        b'-' => (-1.0, &s[1..]),
        _ => (1.0, s),
    };
    let num_end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    let (number, suffix) = rest.split_at(num_end);
    let digits = number.replace('.', "");
    if digits.is_empty() || number.matches('.').count() > 1 {
        return None;
    }
    let value: f64 = number.parse().ok()?;
    let multiplier = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        exp if exp.starts_with(['e', 'E']) => {
            let e = &exp[1..];
            let unsigned = e.strip_prefix(['+', '-']).unwrap_or(e);
            if unsigned.is_empty() || !unsigned.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            10f64.powi(e.parse().ok()?)
        }
        _ => return None,
    };
    Some(sign * value * multiplier)
}

/// True when `s` is a DNS-1123 subdomain (most object names): at most 253 characters, dot-separated
/// DNS-1123 labels.
pub fn is_dns1123_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

/// True when `s` is a valid Secret / ConfigMap key (`[-._a-zA-Z0-9]+`, at most 253, not `.` or
/// `..`): also safe as a file name under a volume mount.
pub fn is_secret_key(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    #[test]
    fn qualified_names() {
        for ok in ["a", "example.com/x", "a.b-c_d", "x/Y9", &"a".repeat(63)] {
            assert!(is_qualified_name(ok), "{ok}");
        }
        for bad in [
            "",
            "/x",
            "x/",
            "-a",
            "a-",
            "bad key",
            "UPPER.example/x",
            &"a".repeat(64),
        ] {
            assert!(!is_qualified_name(bad), "{bad}");
        }
    }

    #[test]
    fn quantities() {
        let cases: &[(&str, Option<f64>)] = &[
            ("0", Some(0.0)),
            ("1", Some(1.0)),
            ("500m", Some(0.5)),
            ("2", Some(2.0)),
            ("1.5", Some(1.5)),
            (".5", Some(0.5)),
            ("5.", Some(5.0)),
            ("+1", Some(1.0)),
            ("-1", Some(-1.0)),
            ("1k", Some(1e3)),
            ("1M", Some(1e6)),
            ("1G", Some(1e9)),
            ("1T", Some(1e12)),
            ("1P", Some(1e15)),
            ("1E", Some(1e18)),
            ("1Ki", Some(1024.0)),
            ("512Mi", Some(512.0 * 1024.0 * 1024.0)),
            ("2Gi", Some(2.0 * 1024f64.powi(3))),
            ("1Ti", Some(1024f64.powi(4))),
            ("1Pi", Some(1024f64.powi(5))),
            ("1Ei", Some(1024f64.powi(6))),
            ("1e3", Some(1e3)),
            ("1E-3", Some(1e-3)),
            ("1e+2", Some(1e2)),
            ("", None),
            ("m", None),
            ("Gi", None),
            (".", None),
            ("1..2", None),
            ("1.2.3", None),
            ("1 Gi", None),
            ("1GB", None),
            ("1gi", None),
            ("1K", None),
            ("1e", None),
            ("1e1.5", None),
            ("--1", None),
            ("0x10", None),
        ];
        for (s, want) in cases {
            let got = parse_quantity(s);
            match (got, want) {
                (Some(g), Some(w)) => assert!((g - w).abs() <= w.abs() * 1e-12, "{s}: {g} != {w}"),
                (g, w) => assert_eq!(g, *w, "{s}"),
            }
        }
    }

    #[test]
    fn name_validators() {
        assert!(is_dns1123_subdomain("a.b-c.d"));
        assert!(!is_dns1123_subdomain(""));
        assert!(!is_dns1123_subdomain("a..b"));
        assert!(!is_dns1123_subdomain(".a"));
        assert!(!is_dns1123_subdomain("A"));
        assert!(!is_dns1123_subdomain(&"a".repeat(254)));
        assert!(is_secret_key("ENCRYPTION_KEY"));
        assert!(is_secret_key(".dot-file_1"));
        assert!(!is_secret_key(""));
        assert!(!is_secret_key("."));
        assert!(!is_secret_key(".."));
        assert!(!is_secret_key("a/b"));
        assert!(!is_secret_key("a b"));
    }

    #[test]
    fn valid_ids_are_unchanged() {
        for id in [
            "abc",
            "a",
            "0",
            "job-1",
            "cm3x8k2l40000abcd1234efgh",
            "550e8400-e29b-41d4-a716-446655440000",
            &"a".repeat(63),
        ] {
            assert_eq!(object_name(id), id, "{id}");
        }
    }

    #[test]
    fn invalid_ids_are_sanitised_and_hashed() {
        let n = object_name("ABC");
        assert_eq!(n, format!("abc-{}", short_hash("ABC")));
        assert_ne!(object_name("ABC"), object_name("abc"));
        assert_eq!(
            object_name("a_b.c"),
            format!("a-b-c-{}", short_hash("a_b.c"))
        );
        assert_eq!(
            object_name("--a--b--"),
            format!("a-b-{}", short_hash("--a--b--"))
        );
        assert_eq!(
            object_name("Ünïcödé"),
            format!("n-c-d-{}", short_hash("Ünïcödé"))
        );
    }

    #[test]
    fn empty_and_all_invalid_ids_still_give_valid_names() {
        for id in ["", "-", "---", "!!!", "ü", " ", "/", "_._"] {
            let n = object_name(id);
            assert!(is_dns1123_label(&n), "{id:?} -> {n}");
            assert!(n.starts_with("job-"), "{n}");
        }
        assert_ne!(object_name(""), object_name("-"));
    }

    #[test]
    fn long_ids_are_truncated_to_63() {
        let id = "a".repeat(64);
        let n = object_name(&id);
        assert_eq!(n.len(), 63);
        assert!(is_dns1123_label(&n));
        assert_eq!(n, format!("{}-{}", "a".repeat(52), short_hash(&id)));
        // A truncation point that lands right after a dash does not leave a dash before the hash.
        let id = format!("{}_{}", "a".repeat(51), "b".repeat(20));
        let n = object_name(&id);
        assert!(is_dns1123_label(&n), "{n}");
        assert_eq!(n, format!("{}-{}", "a".repeat(51), short_hash(&id)));
    }

    #[test]
    fn hash_shaped_valid_ids_are_rehashed() {
        let hashed = object_name("ABC");
        // Someone choosing the hashed name of another id as their id does not get that name.
        assert_ne!(object_name(&hashed), hashed);
        assert!(is_dns1123_label(&object_name(&hashed)));
        // Uppercase hex or 9/11 hex characters are not hash-shaped.
        assert_eq!(
            object_name("x-0123456789"),
            format!("x-0123456789-{}", short_hash("x-0123456789"))
        );
        assert_eq!(object_name("x-012345678"), "x-012345678");
        assert_eq!(object_name("x-0123456789a"), "x-0123456789a");
        assert_eq!(object_name("0123456789"), "0123456789");
        assert!(has_hash_suffix("a-abcdef0123"));
        assert!(!has_hash_suffix("a-abcdeg0123"));
        assert!(!has_hash_suffix("abcdef0123"));
    }

    #[test]
    fn label_values() {
        assert_eq!(label_value(""), "");
        assert_eq!(label_value("User_1.x-Y"), "User_1.x-Y");
        assert_eq!(
            label_value("user@example.com"),
            format!("user-example.com-{}", short_hash("user@example.com"))
        );
        assert_eq!(label_value("_a_"), format!("a-{}", short_hash("_a_")));
        assert_eq!(label_value("!!!"), format!("id-{}", short_hash("!!!")));
        assert_eq!(label_value("ABC"), "ABC");
        assert_ne!(label_value("a b"), label_value("a/b"));
        let long = "U".repeat(64);
        assert_eq!(
            label_value(&long),
            format!("{}-{}", "U".repeat(52), short_hash(&long))
        );
        // Trailing non-alphanumerics at the truncation point are trimmed.
        let id = format!("{}._{}", "a".repeat(50), "b".repeat(20));
        let v = label_value(&id);
        assert!(is_label_value(&v), "{v}");
        assert_eq!(v, format!("{}-{}", "a".repeat(50), short_hash(&id)));
    }

    #[test]
    fn validators() {
        assert!(is_dns1123_label("a"));
        assert!(is_dns1123_label("a-b"));
        assert!(is_dns1123_label("1a"));
        assert!(!is_dns1123_label(""));
        assert!(!is_dns1123_label("-a"));
        assert!(!is_dns1123_label("a-"));
        assert!(!is_dns1123_label("A"));
        assert!(!is_dns1123_label("a.b"));
        assert!(!is_dns1123_label("a_b"));
        assert!(!is_dns1123_label(&"a".repeat(64)));
        assert!(is_dns1123_label(&"a".repeat(63)));
        assert!(is_label_value(""));
        assert!(is_label_value("A.b_c-D"));
        assert!(!is_label_value(".a"));
        assert!(!is_label_value("a_"));
        assert!(!is_label_value("a b"));
        assert!(!is_label_value("a/b"));
        assert!(!is_label_value(&"a".repeat(64)));
    }

    #[test]
    fn display_repo_strips_credentials() {
        let cases = [
            (
                "https://github.com/acme/api.git",
                "https://github.com/acme/api.git",
            ),
            (
                "https://oauth2:ghp_secret@github.com/acme/api.git",
                "https://github.com/acme/api.git",
            ),
            (
                "https://user@gitlab.example.com:8443/g/p.git",
                "https://gitlab.example.com:8443/g/p.git",
            ),
            ("https://a:b@c@host/p", "https://host/p"),
            (
                "https://host/p.git?private_token=secret",
                "https://host/p.git",
            ),
            ("https://host/p.git#frag", "https://host/p.git"),
            ("https://tok@host", "https://host"),
            ("git@github.com:acme/api.git", "github.com:acme/api.git"),
            ("  https://host/x  ", "https://host/x"),
            ("", ""),
            ("https://host/path/with@at", "https://host/path/with@at"),
        ];
        for (input, want) in cases {
            assert_eq!(display_repo(input), want, "{input}");
        }
    }

    /// Inputs that need changing: at least one character outside the label alphabet, or hash-shaped.
    fn changed_inputs() -> Vec<String> {
        let mut v: Vec<String> = vec![
            "".into(),
            "-".into(),
            "--".into(),
            "A".into(),
            "a".into(),
            "Ab".into(),
            "aB".into(),
            "a_b".into(),
            "a.b".into(),
            "a b".into(),
            "a/b".into(),
            "a:b".into(),
            "a--b".into(),
            "a-b-".into(),
            "-a-b".into(),
            "ü".into(),
            "u".into(),
            "U".into(),
        ];
        for i in 0..500 {
            v.push(format!("Job_{i}"));
            v.push(format!("job_{i}"));
            v.push(format!("JOB-{i}"));
            v.push(format!("job.{i}"));
            v.push(format!("{}{i}", "x".repeat(70)));
            v.push(format!("{i}{}", "y".repeat(70)));
        }
        v
    }

    #[test]
    fn no_collisions_among_many_inputs() {
        let mut names: HashMap<String, String> = HashMap::new();
        let mut labels: HashMap<String, String> = HashMap::new();
        let mut inputs = changed_inputs();
        // Also valid ids and the hashed names of other ids used as ids.
        let hashed: Vec<String> = inputs.iter().map(|i| object_name(i)).collect();
        inputs.extend(hashed);
        for i in 0..500 {
            inputs.push(format!("job-{i}"));
        }
        inputs.sort();
        inputs.dedup();
        for input in &inputs {
            let n = object_name(input);
            assert!(is_dns1123_label(&n), "{input:?} -> {n}");
            if let Some(prev) = names.insert(n.clone(), input.clone()) {
                panic!("object_name collision: {prev:?} and {input:?} -> {n}");
            }
            let l = label_value(input);
            assert!(is_label_value(&l), "{input:?} -> {l}");
            if let Some(prev) = labels.insert(l.clone(), input.clone()) {
                panic!("label_value collision: {prev:?} and {input:?} -> {l}");
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn object_name_is_always_a_valid_label(s in any::<String>()) {
            let n = object_name(&s);
            prop_assert!(is_dns1123_label(&n), "{:?} -> {}", s, n);
            prop_assert_eq!(&n, &object_name(&s));
        }

        #[test]
        fn object_name_of_label_alphabet(s in "[a-zA-Z0-9._ -]{0,80}") {
            let n = object_name(&s);
            prop_assert!(is_dns1123_label(&n));
            if is_dns1123_label(&s) && !has_hash_suffix(&s) {
                prop_assert_eq!(n, s);
            } else {
                prop_assert!(has_hash_suffix(&n));
            }
        }

        #[test]
        fn label_value_is_always_valid(s in any::<String>()) {
            let v = label_value(&s);
            prop_assert!(is_label_value(&v), "{:?} -> {}", s, v);
            prop_assert_eq!(&v, &label_value(&s));
        }

        #[test]
        fn distinct_inputs_give_distinct_names(a in "[a-zA-Z0-9_.-]{0,70}", b in "[a-zA-Z0-9_.-]{0,70}") {
            prop_assume!(a != b);
            prop_assert_ne!(object_name(&a), object_name(&b));
            prop_assert_ne!(label_value(&a), label_value(&b));
        }

        #[test]
        fn case_variants_never_collide(s in "[a-z]{1,20}") {
            let upper = s.to_uppercase();
            prop_assert_ne!(object_name(&s), object_name(&upper));
        }

        #[test]
        fn display_repo_never_keeps_userinfo(user in "[a-z]{1,8}", pass in "[A-Za-z0-9_]{4,20}", path in "(/[a-z]{1,8}){0,3}") {
            let url = format!("https://{user}:{pass}@example.com{path}");
            let shown = display_repo(&url);
            prop_assert_eq!(&shown, &format!("https://example.com{path}"));
            prop_assert!(!shown.contains(&pass));
        }
    }
}

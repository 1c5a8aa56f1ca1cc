//! Timestamps in the contract's format: RFC 3339 UTC with milliseconds, as JavaScript's
//! `Date.prototype.toISOString()` writes them (`2026-11-23T10:15:30.123Z`).

use jiff::Timestamp;

/// Formats a timestamp the way the web app does.
pub fn format(ts: Timestamp) -> String {
    ts.strftime("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

/// Now, in the contract's format.
pub fn now() -> String {
    format(Timestamp::now())
}

/// Parses a contract timestamp (any RFC 3339 form is accepted).
pub fn parse(s: &str) -> Option<Timestamp> {
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_like_javascript_to_iso_string() {
        let ts: Timestamp = "2026-11-23T10:15:30.123456Z".parse().unwrap();
        assert_eq!(format(ts), "2026-11-23T10:15:30.123Z");
        let whole: Timestamp = "2026-01-02T03:04:05Z".parse().unwrap();
        assert_eq!(format(whole), "2026-01-02T03:04:05.000Z");
    }

    #[test]
    fn now_round_trips() {
        let s = now();
        assert_eq!(s.len(), 24, "{s}");
        assert!(s.ends_with('Z'));
        assert!(parse(&s).is_some());
    }
}

//! Entry ids of the jobs stream ([`crate::keys::JOBS_STREAM`]): the web app's XADD gives each
//! job one, a RepoboxJob keeps it (`spec.streamEntryId`), and it orders a user's jobs.

use std::fmt;
use std::str::FromStr;

/// A Redis stream entry id, `<milliseconds>-<sequence>`, ordered numerically.
///
/// String comparison would be wrong: `"999-0" > "1000-0"` as strings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EntryId {
    /// Milliseconds part (Unix time of the XADD).
    pub ms: u64,
    /// Sequence number within the millisecond.
    pub seq: u64,
}

impl EntryId {
    /// Sorts after every real id: used for ids that do not parse, so that a malformed id never
    /// jumps ahead of well-formed ones.
    pub const MAX: EntryId = EntryId {
        ms: u64::MAX,
        seq: u64::MAX,
    };

    /// Parses an id, falling back to [`EntryId::MAX`] when it is malformed (the CRD schema
    /// rejects malformed ids, so this only guards against objects written around it).
    ///
    /// ```
    /// use repobox_contract::EntryId;
    ///
    /// assert_eq!(EntryId::parse_or_max("1700000000000-3"), EntryId { ms: 1_700_000_000_000, seq: 3 });
    /// assert_eq!(EntryId::parse_or_max("garbage"), EntryId::MAX);
    /// assert!(EntryId::parse_or_max("5-0") < EntryId::parse_or_max("5-1"));
    /// ```
    pub fn parse_or_max(s: &str) -> EntryId {
        s.parse().unwrap_or(EntryId::MAX)
    }
}

/// The error of parsing an [`EntryId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a Redis stream id (<milliseconds>-<sequence>)")]
pub struct ParseEntryIdError;

impl FromStr for EntryId {
    type Err = ParseEntryIdError;

    /// Accepts `<ms>-<seq>` and a bare `<ms>` (sequence 0), decimal digits only.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        fn num(s: &str) -> Result<u64, ParseEntryIdError> {
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(ParseEntryIdError);
            }
            s.parse().map_err(|_| ParseEntryIdError)
        }
        match s.split_once('-') {
            Some((ms, seq)) => Ok(EntryId {
                ms: num(ms)?,
                seq: num(seq)?,
            }),
            None => Ok(EntryId {
                ms: num(s)?,
                seq: 0,
            }),
        }
    }
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_ids_parse_and_order_numerically() {
        assert_eq!(
            "1700000000000-0".parse(),
            Ok(EntryId {
                ms: 1_700_000_000_000,
                seq: 0
            })
        );
        assert_eq!("5".parse(), Ok(EntryId { ms: 5, seq: 0 }));
        assert_eq!(
            "18446744073709551615-18446744073709551615".parse(),
            Ok(EntryId::MAX)
        );
        for bad in [
            "",
            "-",
            "1-",
            "-1",
            "a-1",
            "1-b",
            "1-2-3",
            "+1-0",
            " 1-0",
            "1-0 ",
            "18446744073709551616-0",
        ] {
            assert_eq!(bad.parse::<EntryId>(), Err(ParseEntryIdError), "{bad:?}");
        }
        let a: EntryId = "999-0".parse().unwrap();
        let b: EntryId = "1000-0".parse().unwrap();
        assert!(a < b, "numeric, not lexicographic");
        let x: EntryId = "1000-9".parse().unwrap();
        let y: EntryId = "1000-10".parse().unwrap();
        assert!(x < y);
        assert_eq!(EntryId::parse_or_max("junk"), EntryId::MAX);
        assert_eq!(a.to_string(), "999-0");
        assert!(!ParseEntryIdError.to_string().is_empty());
    }
}

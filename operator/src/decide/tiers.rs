//! Quota tiers: which running limit applies to a user, from three sources, first usable wins.
//!
//! 1. `runner:user_limits` (hash userId → an integer limit or a plan name), written by the web
//!    app whenever it likes: the admission loop reads it with HMGET for the users that have
//!    queued jobs, on every pass, so a change applies on the next pass (at most a second while
//!    jobs wait, see `dispatcher`) and nothing is cached beyond a pass;
//! 2. the plan of the user's newest unfinished job (`spec.plan`, copied at intake from the
//!    optional `plan` field of the stream entry or job record), mapped through `PLAN_LIMITS`
//!    (the chart's `config.planLimits`). The newest job carries the web app's latest word, so
//!    an upgrade takes effect with the next submission even without an override;
//! 3. `MAX_JOBS_PER_USER`, labelled plan `default` (today's behaviour when none is present).
//!
//! A value that cannot be used (not a limit in `1..=MAX_LIMIT`, an unknown plan) is skipped in
//! favour of the next source and reported as a [`Resolved::problem`], which the dispatcher turns
//! into a Warning Event and a counter: a typo in Redis never stops admission or the operator.
//! The plan label of a resolution is a configured plan name, `default` or `custom` (an integer
//! override), so metrics labelled by it stay bounded by the configuration.
//!
//! Everything here is pure; the Redis reads live in `outcome`.

use std::collections::BTreeMap;

use repobox_contract::EntryId;

/// The largest limit accepted from `PLAN_LIMITS` or `runner:user_limits`: far above any real
/// plan, low enough that a stray large number is recognised as a mistake.
pub const MAX_LIMIT: u32 = 1000;

/// The plan label when `MAX_JOBS_PER_USER` applies.
pub const DEFAULT_PLAN: &str = "default";
/// The plan label of an integer limit set for one user in `runner:user_limits`.
pub const CUSTOM_PLAN: &str = "custom";

/// `PLAN_LIMITS`: plan name → running limit per user.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PlanLimits(BTreeMap<String, u32>);

impl PlanLimits {
    /// Parses the JSON object `{"free": 1, "pro": 4}`; empty text means no plans. Plan names
    /// are 1-63 characters of `[A-Za-z0-9._-]` and may not be `default` or `custom` (the labels
    /// reserved above); limits are integers in `1..=MAX_LIMIT`.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        let map: BTreeMap<String, serde_json::Value> = serde_json::from_str(text)
            .map_err(|e| format!("is not a JSON object of plan name to limit: {e}"))?;
        let mut plans = BTreeMap::new();
        for (name, value) in map {
            if !is_plan_name(&name) {
                return Err(format!(
                    "plan name {name:?} must be 1-63 characters of letters, digits, '.', '_' or '-'"
                ));
            }
            if name == DEFAULT_PLAN || name == CUSTOM_PLAN {
                return Err(format!("plan name {name:?} is reserved"));
            }
            let limit = value
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .filter(|n| (1..=MAX_LIMIT).contains(n))
                .ok_or_else(|| {
                    format!("the limit of plan {name:?} must be an integer from 1 to {MAX_LIMIT}")
                })?;
            plans.insert(name, limit);
        }
        Ok(Self(plans))
    }

    /// The limit of `plan`, if configured.
    pub fn get(&self, plan: &str) -> Option<u32> {
        self.0.get(plan).copied()
    }

    /// Every configured plan and its limit, in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, u32)> {
        self.0.iter().map(|(k, v)| (k.as_str(), *v))
    }
}

/// Whether `s` can be a plan name (and so a metric label value).
pub fn is_plan_name(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// A user's effective running limit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// The running limit.
    pub limit: u32,
    /// Where it came from: a plan name, [`DEFAULT_PLAN`] or [`CUSTOM_PLAN`].
    pub plan: String,
    /// A value that was skipped because it is unusable, described for a Warning (never a
    /// secret: limits and plan names only).
    pub problem: Option<String>,
}

/// The limit of a user, from the `runner:user_limits` value (`user_value`), the plan of their
/// newest job (`job_plan`) and the configuration. See the module documentation for the order.
pub fn resolve(
    user_value: Option<&str>,
    job_plan: Option<&str>,
    plans: &PlanLimits,
    default_limit: u32,
) -> Resolved {
    let mut problems: Vec<String> = Vec::new();
    if let Some(raw) = user_value.map(str::trim).filter(|v| !v.is_empty()) {
        if raw.bytes().all(|b| b.is_ascii_digit()) {
            match raw.parse::<u32>() {
                Ok(n) if (1..=MAX_LIMIT).contains(&n) => {
                    return Resolved {
                        limit: n,
                        plan: CUSTOM_PLAN.into(),
                        problem: None,
                    };
                }
                _ => problems.push(format!(
                    "runner:user_limits value {} is not a limit from 1 to {MAX_LIMIT}",
                    shown(raw)
                )),
            }
        } else if let Some(limit) = plans.get(raw) {
            return Resolved {
                limit,
                plan: raw.into(),
                problem: None,
            };
        } else {
            problems.push(format!(
                "runner:user_limits value {} is neither a limit nor a plan in PLAN_LIMITS",
                shown(raw)
            ));
        }
    }
    if let Some(plan) = job_plan.map(str::trim).filter(|p| !p.is_empty()) {
        if let Some(limit) = plans.get(plan) {
            return Resolved {
                limit,
                plan: plan.into(),
                problem: join(problems),
            };
        }
        problems.push(format!("plan {} is not in PLAN_LIMITS", shown(plan)));
    }
    Resolved {
        limit: default_limit,
        plan: DEFAULT_PLAN.into(),
        problem: join(problems),
    }
}

fn join(problems: Vec<String>) -> Option<String> {
    (!problems.is_empty()).then(|| problems.join("; "))
}

/// A value from Redis quoted for a message, cut to 40 characters: it is data from the web app
/// and could be anything.
fn shown(value: &str) -> String {
    let cut: String = value.chars().take(40).collect();
    if cut.len() < value.len() {
        format!("{cut:?}…")
    } else {
        format!("{cut:?}")
    }
}

/// The plan of each user's newest job (by stream order) among `jobs` (user, stream id, plan);
/// a user whose newest job has no plan maps to `None`.
pub fn newest_plans<'a>(
    jobs: impl IntoIterator<Item = (&'a str, EntryId, Option<&'a str>)>,
) -> BTreeMap<&'a str, Option<&'a str>> {
    let mut newest: BTreeMap<&str, (EntryId, Option<&str>)> = BTreeMap::new();
    for (user, id, plan) in jobs {
        match newest.get(user) {
            Some((seen, _)) if *seen >= id => {}
            _ => {
                newest.insert(user, (id, plan));
            }
        }
    }
    newest.into_iter().map(|(u, (_, p))| (u, p)).collect()
}

/// The waiting message of a job held by its user's limit, e.g.
/// `waiting: user u1 has 2 of 2 jobs running for plan free`.
pub fn user_quota_message(user: &str, running: usize, resolved: &Resolved) -> String {
    let source = match resolved.plan.as_str() {
        DEFAULT_PLAN => "plan default (MAX_JOBS_PER_USER)".to_owned(),
        CUSTOM_PLAN => "the limit set for this user (runner:user_limits)".to_owned(),
        plan => format!("plan {plan}"),
    };
    format!(
        "waiting: user {user} has {running} of {} jobs running for {source}",
        resolved.limit
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plans() -> PlanLimits {
        PlanLimits::parse(r#"{"free": 1, "pro": 4, "team.v2": 10}"#).unwrap()
    }

    fn id(ms: u64) -> EntryId {
        EntryId { ms, seq: 0 }
    }

    #[test]
    fn plan_limits_parse() {
        let p = plans();
        assert_eq!(p.get("free"), Some(1));
        assert_eq!(p.get("pro"), Some(4));
        assert_eq!(p.get("team.v2"), Some(10));
        assert_eq!(p.get("gold"), None);
        assert_eq!(
            p.iter().collect::<Vec<_>>(),
            [("free", 1), ("pro", 4), ("team.v2", 10)]
        );
        assert_eq!(PlanLimits::parse("").unwrap(), PlanLimits::default());
        assert_eq!(PlanLimits::parse("  {} ").unwrap(), PlanLimits::default());
        for bad in [
            "[]",
            "{",
            r#"{"free": 0}"#,
            r#"{"free": -1}"#,
            r#"{"free": 1.5}"#,
            r#"{"free": "1"}"#,
            r#"{"free": 1001}"#,
            r#"{"": 1}"#,
            r#"{"a b": 1}"#,
            r#"{"default": 1}"#,
            r#"{"custom": 1}"#,
        ] {
            assert!(PlanLimits::parse(bad).is_err(), "{bad}");
        }
        let long = format!(r#"{{"{}": 1}}"#, "x".repeat(64));
        assert!(PlanLimits::parse(&long).is_err());
        assert!(PlanLimits::parse(r#"{"free": 1000}"#).is_ok());
    }

    #[test]
    fn plan_names() {
        assert!(is_plan_name("pro"));
        assert!(is_plan_name("Team_2.b-c"));
        assert!(!is_plan_name(""));
        assert!(!is_plan_name("a\"b"));
        assert!(!is_plan_name("é"));
        assert!(is_plan_name(&"x".repeat(63)));
        assert!(!is_plan_name(&"x".repeat(64)));
    }

    #[test]
    fn nothing_set_is_todays_default() {
        let r = resolve(None, None, &plans(), 3);
        assert_eq!(
            r,
            Resolved {
                limit: 3,
                plan: "default".into(),
                problem: None
            }
        );
        assert_eq!(resolve(Some("  "), Some(""), &plans(), 3), r);
        assert_eq!(resolve(None, None, &PlanLimits::default(), 3), r);
    }

    #[test]
    fn job_plan_maps_through_plan_limits() {
        let r = resolve(None, Some("free"), &plans(), 3);
        assert_eq!((r.limit, r.plan.as_str(), r.problem), (1, "free", None));
        let r = resolve(None, Some(" pro "), &plans(), 3);
        assert_eq!((r.limit, r.plan.as_str()), (4, "pro"));
    }

    #[test]
    fn user_value_wins_as_integer_or_plan() {
        let r = resolve(Some("7"), Some("free"), &plans(), 3);
        assert_eq!((r.limit, r.plan.as_str(), r.problem), (7, "custom", None));
        let r = resolve(Some("pro"), Some("free"), &plans(), 3);
        assert_eq!((r.limit, r.plan.as_str(), r.problem), (4, "pro", None));
        let r = resolve(Some("1000"), None, &plans(), 3);
        assert_eq!(r.limit, 1000);
    }

    #[test]
    fn unusable_values_fall_back_with_a_problem() {
        for bad in [
            "0",
            "1001",
            "99999999999999999999",
            "-1",
            "2.5",
            "gold",
            "1 2",
        ] {
            // Falls back to the job's plan when that is usable...
            let r = resolve(Some(bad), Some("free"), &plans(), 3);
            assert_eq!((r.limit, r.plan.as_str()), (1, "free"), "{bad}");
            assert!(r.problem.as_deref().unwrap().contains("runner:user_limits"));
            // ...else to the default.
            let r = resolve(Some(bad), None, &plans(), 3);
            assert_eq!((r.limit, r.plan.as_str()), (3, "default"), "{bad}");
            assert!(r.problem.is_some(), "{bad}");
        }
        let r = resolve(None, Some("gold"), &plans(), 3);
        assert_eq!((r.limit, r.plan.as_str()), (3, "default"));
        assert_eq!(
            r.problem.as_deref(),
            Some("plan \"gold\" is not in PLAN_LIMITS")
        );
        // Both unusable: both named.
        let r = resolve(Some("x"), Some("gold"), &plans(), 3);
        let p = r.problem.unwrap();
        assert!(p.contains("\"x\"") && p.contains("\"gold\""), "{p}");
        // Long values are cut in messages.
        let r = resolve(Some(&"y".repeat(500)), None, &plans(), 3);
        assert!(r.problem.unwrap().len() < 150);
    }

    #[test]
    fn newest_job_decides_the_plan() {
        let jobs = [
            ("u1", id(1), Some("free")),
            ("u1", id(5), Some("pro")),
            ("u1", id(3), None),
            ("u2", id(2), None),
            ("u3", id(9), Some("free")),
            ("u3", id(9), Some("pro")),
        ];
        let n = newest_plans(jobs);
        assert_eq!(n["u1"], Some("pro"));
        assert_eq!(n["u2"], None);
        assert_eq!(n["u3"], Some("free"), "ties keep the first seen");
        assert_eq!(n.len(), 3);
    }

    #[test]
    fn messages_name_the_plan() {
        let r = resolve(None, Some("free"), &plans(), 3);
        assert_eq!(
            user_quota_message("u1", 1, &r),
            "waiting: user u1 has 1 of 1 jobs running for plan free"
        );
        let r = resolve(Some("5"), None, &plans(), 3);
        assert!(user_quota_message("u", 5, &r).contains("runner:user_limits"));
        let r = resolve(None, None, &plans(), 3);
        assert!(user_quota_message("u", 3, &r).ends_with("plan default (MAX_JOBS_PER_USER)"));
    }
}

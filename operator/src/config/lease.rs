//! Leader election: whether to run only while holding a Lease, and which Lease.

use clap::builder::BoolishValueParser;

/// The leader-election settings (help heading "Leader election").
#[derive(clap::Args, Clone, Debug, PartialEq)]
pub struct LeaseSettings {
    /// Run only while holding the Lease (for more than one replica).
    #[arg(long, env = "LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set, value_parser = BoolishValueParser::new())]
    pub leader_election: bool,

    /// The Lease used for leader election.
    #[arg(long, env = "LEASE_NAME", default_value = "repobox-operator")]
    pub lease_name: String,

    /// The Lease's namespace. Default: `POD_NAMESPACE`, else the jobs namespace.
    #[arg(long, env = "LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,

    /// How long a Lease is valid without renewal.
    #[arg(long, env = "LEASE_DURATION_SECONDS", default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..))]
    pub lease_duration_seconds: u64,
}

//! Quotas and the queue: how many jobs run at once, how many may wait, and how long a job may
//! run, wait for a node or be kept once finished.

/// The quota and queue settings (help heading "Quotas and queue").
#[derive(clap::Args, Clone, Debug, PartialEq)]
pub struct QuotaSettings {
    /// Maximum jobs running at once, in all (the contract's `MAX_CONCURRENT_JOBS`).
    #[arg(long, env = "MAX_CONCURRENT_JOBS", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_jobs: u32,

    /// Maximum jobs of one user running at once (the contract's `MAX_JOBS_PER_USER`).
    #[arg(long, env = "MAX_JOBS_PER_USER", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_jobs_per_user: u32,

    /// Backpressure: intake stops reading the stream while this many RepoboxJobs are queued.
    #[arg(long, env = "MAX_QUEUED", default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_queued: u32,

    /// At most this many queued jobs per user (0: no per-user cap): a user's entry beyond it
    /// fails at intake with a clear error, so one user cannot fill the queue.
    #[arg(long, env = "MAX_QUEUED_PER_USER", default_value_t = 0)]
    pub max_queued_per_user: u32,

    /// Quota tiers: a JSON object of plan name → running limit per user, e.g.
    /// `{"free": 1, "pro": 4}`. A job's `plan` (or the user's value in `runner:user_limits`)
    /// selects one; users without a usable plan get `MAX_JOBS_PER_USER`.
    #[arg(long, env = "PLAN_LIMITS", default_value = "")]
    pub plan_limits: String,

    /// Default job timeout in seconds (the Job's `activeDeadlineSeconds`); a RepoboxJob's
    /// `spec.timeoutSeconds` overrides it.
    #[arg(long, env = "JOB_TIMEOUT", default_value_t = 3600, value_parser = clap::value_parser!(u32).range(1..))]
    pub job_timeout: u32,

    /// Finished RepoboxJobs are deleted this long after completion.
    #[arg(long, env = "RETENTION_SECONDS", default_value_t = 86400, value_parser = clap::value_parser!(u64).range(1..))]
    pub retention_seconds: u64,

    /// A runner pod pending (unschedulable, image pull failing, …) this long fails the job.
    #[arg(long, env = "PENDING_TIMEOUT_SECONDS", default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..))]
    pub pending_timeout_seconds: u64,
}

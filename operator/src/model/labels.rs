//! Label keys and values, selectors, the field manager and the finalizer: the names by which
//! the operator finds its own objects. Shared by the intake, the builders and the loops, so
//! they live below all of them.

/// The field manager of every write the operator makes.
pub const FIELD_MANAGER: &str = "repobox-operator";

/// The finalizer that lets the operator record `cancelled` in Redis before a RepoboxJob goes.
pub const FINALIZER: &str = "repobox.dev/cancel-in-redis";

/// `app.kubernetes.io/name` of runner Jobs and pods.
pub const APP_NAME: &str = "repobox-job-runner";
/// `app.kubernetes.io/component` of runner Jobs and pods.
pub const COMPONENT: &str = "job";
/// `app.kubernetes.io/part-of` of everything Repobox.
pub const PART_OF: &str = "repobox";
/// `app.kubernetes.io/managed-by` of the Jobs this operator creates.
pub const MANAGED_BY: &str = "repobox-operator";

/// Label key: `app.kubernetes.io/name`.
pub const LABEL_NAME: &str = "app.kubernetes.io/name";
/// Label key: `app.kubernetes.io/instance` (the RepoboxJob name).
pub const LABEL_INSTANCE: &str = "app.kubernetes.io/instance";
/// Label key: `app.kubernetes.io/component`.
pub const LABEL_COMPONENT: &str = "app.kubernetes.io/component";
/// Label key: `app.kubernetes.io/part-of`.
pub const LABEL_PART_OF: &str = "app.kubernetes.io/part-of";
/// Label key: `app.kubernetes.io/managed-by`.
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Label key: the Repobox job id ([`label_value`](crate::model::names::label_value) of `spec.jobId`).
pub const LABEL_JOB_ID: &str = "repobox.dev/job-id";
/// Label key: the Repobox user id ([`label_value`](crate::model::names::label_value) of `spec.userId`).
pub const LABEL_USER: &str = "repobox.dev/user";

/// Label selector for the Jobs (and pods) this operator manages: what the controller's Job watch
/// uses, so it never caches unrelated Jobs of the namespace.
pub const MANAGED_BY_SELECTOR: &str = "app.kubernetes.io/managed-by=repobox-operator";

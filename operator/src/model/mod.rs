//! The vocabulary: the custom resource, Kubernetes-safe names, labels and the runner pod's
//! layout. Depends on nothing else in the crate.

pub mod crd;
pub mod labels;
pub mod names;
pub mod pod_layout;

//! Fails when the checked-in CRD differs from what the Rust types generate, so a change to
//! `operator/src/crd.rs` cannot ship without the matching `crds/` update.

use repobox_operator::model::crd::{CRD_PATH, CRDGEN_COMMAND, crd_yaml};

#[test]
fn checked_in_crd_matches_the_types() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(CRD_PATH);
    let generated = crd_yaml().unwrap_or_else(|e| panic!("generating the CRD failed: {e}"));
    let checked_in = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read {}: {e}\nGenerate it with: {CRDGEN_COMMAND}",
            path.display()
        )
    });
    if checked_in != generated {
        let first_difference = checked_in
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .map(|i| i + 1)
            .unwrap_or_else(|| checked_in.lines().count().min(generated.lines().count()) + 1);
        panic!(
            "{CRD_PATH} is out of date with operator/src/crd.rs (first difference at line {first_difference}).\n\
             Regenerate it with: {CRDGEN_COMMAND}"
        );
    }
}

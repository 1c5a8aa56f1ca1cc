# The two commands that matter on a fresh machine:
#   make test   - every check and test (what CI runs, followed by the demo)
#   make demo   - the whole system on an emulated cluster
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: test deps lint unit chart demo bench crds fmt

## Installs what the tests need: redis-server and etcd-server (Debian) and the Python venv of
## the test bed: the emulator, and the Helm SDK (chart checks; the real-cluster e2e suite renders
## the chart's RBAC with it). (The control-plane tests also need REPOBOX_K8S_ASSETS, see README.md.)
deps:
	@command -v redis-server >/dev/null || { \
	  echo "installing redis-server"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq redis-server; \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq redis-server; fi; }
	@command -v etcd >/dev/null || { \
	  echo "installing etcd-server"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq etcd-server; \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq etcd-server; fi; }
	@command -v git >/dev/null || { echo "git is required" >&2; exit 1; }
	@[ -x $(PY) ] || python3 -m venv $(VENV)
	@$(PY) -m pip install -q --disable-pip-version-check -r tests/emulator/requirements.txt
	@$(PY) -m pip install -q --disable-pip-version-check -r tests/chart/requirements.txt

## Formatting and lints, warnings are errors.
lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps -q

## All Rust tests: unit, property, and integration tests on real redis-server, git and the
## Kubernetes API emulator with the cluster simulator (which runs the real job-runner binary,
## hence the explicit build first). Includes the CRD drift check.
unit:
	cargo build -p repobox-job-runner --bin repobox-job-runner
	cargo test --workspace --lib --bins --tests
	cargo test --workspace --doc

## The Helm chart: lint, render under eight value sets, validate against the Kubernetes 1.28
## schemas, check security properties and drift against the operator's settings.
chart:
	bash tests/chart/run.sh

test: deps lint unit chart

## The whole system on one machine: Redis, a git host, a real control plane (REPOBOX_K8S_ASSETS)
## or else the API emulator, the real operator and job-runner, two users' jobs.
demo:
	bash scripts/demo.sh

## Benchmarks (not part of `make test`): executor vs raw git, operator throughput.
bench: deps
	cargo bench -p repobox-job-runner
	cargo bench -p repobox-operator

## Regenerates crds/ (and the chart's copy) from the Rust types.
crds:
	cargo run -q -p repobox-operator -- crdgen --out crds/repoboxjobs.repobox.dev.yaml
	cp crds/repoboxjobs.repobox.dev.yaml charts/repobox-operator/crds/

fmt:
	cargo fmt --all

#!/usr/bin/env bash
# `make demo`: the whole Repobox runner side on one machine. With REPOBOX_K8S_ASSETS (the
# directory of kube-apiserver, kube-controller-manager and kube-scheduler; `.ci/run` sets it) on
# a REAL Kubernetes control plane (etcd from `etcd-server`) with the test bed's kubelet;
# otherwise on the Kubernetes API emulator with the cluster simulator. The demo says which.
#
# Installs what is missing (redis-server, etcd-server when the assets are set, the Python venv
# of the Kubernetes API emulator), builds the operator, the job-runner and the demo, then runs
# `repobox-demo`, which starts Redis, a local git host, the cluster and the real operator,
# submits five jobs for two users the way the web app does and shows them run to the end.
# Exits with the demo's code: 0 only when every job succeeded and its branch was pushed.
#
# Non-interactive (fine in CI: no stdin, no TTY). See docs/demo.md.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
export DEBIAN_FRONTEND=noninteractive

say() { printf '==> %s\n' "$*"; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null; then sudo -n "$@"
  else echo "need root to run: $*" >&2; return 1
  fi
}

apt_install() {
  command -v apt-get >/dev/null || { echo "apt-get not found: please install $*" >&2; return 1; }
  as_root apt-get update -qq
  as_root apt-get install -y -qq "$@" >/dev/null
}

# --- redis-server (Debian package) --------------------------------------------------------
if ! command -v redis-server >/dev/null; then
  say "installing redis-server"
  apt_install redis-server
fi

# --- etcd-server (Debian package), only for the real control plane -----------------------
if [ -n "${REPOBOX_K8S_ASSETS:-}" ] && ! command -v etcd >/dev/null; then
  say "installing etcd-server (for the real control plane in REPOBOX_K8S_ASSETS)"
  apt_install etcd-server
fi
if [ -n "${REPOBOX_K8S_ASSETS:-}" ]; then
  say "REPOBOX_K8S_ASSETS=$REPOBOX_K8S_ASSETS: the demo uses a real Kubernetes control plane"
else
  say "REPOBOX_K8S_ASSETS is not set: the demo uses the Kubernetes API emulator"
fi

# --- git (the git host and the job-runner use the git CLI) ----------------------------------
if ! command -v git >/dev/null; then
  say "installing git"
  apt_install git
fi

# --- Python venv for the Kubernetes API emulator ------------------------------------------
if ! [ -x .venv/bin/python ] || ! .venv/bin/python -c 'import kmock, aiohttp, jsonpatch' 2>/dev/null; then
  say "creating the Python venv for the Kubernetes API emulator (.venv)"
  if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    apt_install python3-venv
  fi
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -r tests/emulator/requirements.txt
fi

# --- kubectl (optional: the demo also runs it against the emulator when present) ----------
if ! command -v kubectl >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null \
     && apt-cache policy kubernetes-client 2>/dev/null | grep -q 'Candidate: [0-9]'; then
    say "installing kubectl (Debian package kubernetes-client; optional)"
    apt_install kubernetes-client || say "could not install kubectl; the demo renders its tables itself"
  else
    say "kubectl not found (optional): the demo renders the kubectl-style tables itself"
  fi
fi

# --- build ---------------------------------------------------------------------------------
say "building repobox-operator, repobox-job-runner and repobox-demo"
cargo build -p repobox-operator -p repobox-job-runner -p repobox-demo --bins

target="${CARGO_TARGET_DIR:-target}"
demo="$target/debug/repobox-demo"
[ -x "$demo" ] || { echo "$demo was not built" >&2; exit 1; }

# --- run -----------------------------------------------------------------------------------
# The demo has its own 5-minute limit and cleans up after itself; `timeout` is a last resort
# (SIGTERM first, which the demo handles by cleaning up, then SIGKILL).
say "running $demo"
set +e
if command -v timeout >/dev/null; then
  timeout --kill-after=30 360 "$demo" </dev/null
else
  "$demo" </dev/null
fi
code=$?
set -e
exit "$code"

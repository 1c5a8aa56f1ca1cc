"""Image checks without a Docker engine: the Dockerfiles build the workspace's real binaries,
run them as non-root from a runtime stage without a compiler, and the runner image provides the
command the operator's Jobs run (RUNNER_COMMAND in operator/src/decide/job_builder.rs)."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import JOB_BUILDER_RS, ROOT, rust_int_const, rust_str_const

DOCKER = ROOT / "docker"
IMAGES = {
    # Dockerfile -> (package, binary)
    "operator.Dockerfile": ("repobox-operator", "repobox-operator"),
    "job-runner.Dockerfile": ("repobox-job-runner", "repobox-job-runner"),
}
BUILD_IMAGE = "rust:1.95-bookworm"
RUNTIME_IMAGES = {
    "operator.Dockerfile": "gcr.io/distroless/cc-debian12:nonroot",
    "job-runner.Dockerfile": "debian:bookworm-slim",
}
COMPILERS = {"gcc", "g++", "cc", "clang", "build-essential", "rustc", "cargo", "rustup", "make",
             "libc6-dev", "golang"}


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, op: str) -> list[str]:
        return [arg for o, arg in self.instructions if o == op]


def parse_dockerfile(path: Path) -> list[Stage]:
    """Instructions per stage, with line continuations joined and comments dropped."""
    lines, buf = [], ""
    for raw in path.read_text().splitlines():
        s = raw.strip()
        if not buf and (not s or s.startswith("#")):
            continue
        if s.startswith("#"):
            continue
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        lines.append(buf + s)
        buf = ""
    assert not buf, f"{path}: dangling continuation"
    stages: list[Stage] = []
    for line in lines:
        op, _, arg = line.partition(" ")
        op = op.upper()
        if op == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", arg.strip(), re.I)
            assert m, line
            stages.append(Stage(m.group(1), m.group(2)))
        else:
            assert stages, f"{path}: {op} before FROM"
            stages[-1].instructions.append((op, arg.strip()))
    return stages


def workspace_bins() -> dict[str, set[str]]:
    """package -> its bin targets, from `cargo metadata` (or the manifests without cargo)."""
    if shutil.which("cargo"):
        out = subprocess.run(
            ["cargo", "metadata", "--format-version", "1", "--no-deps", "--offline"],
            cwd=ROOT, check=True, capture_output=True, text=True).stdout
        meta = json.loads(out)
        return {p["name"]: {t["name"] for t in p["targets"] if "bin" in t["kind"]}
                for p in meta["packages"]}
    pytest.skip("cargo not found")


@pytest.fixture(scope="module")
def bins():
    return workspace_bins()


@pytest.mark.parametrize("dockerfile", sorted(IMAGES))
def test_build_stage_builds_a_real_workspace_binary(dockerfile, bins):
    stages = parse_dockerfile(DOCKER / dockerfile)
    assert len(stages) >= 2, "multi-stage build expected"
    build = stages[0]
    assert build.base == BUILD_IMAGE and build.name
    runs = " ".join(build.all("RUN"))
    m = re.search(r"cargo build ([^&;]*)", runs)
    assert m, "no cargo build"
    args = shlex.split(m.group(1))
    assert "--release" in args and "--locked" in args
    package = args[args.index("-p") + 1]
    binary = args[args.index("--bin") + 1]
    assert (package, binary) == IMAGES[dockerfile]
    assert package in bins, f"{package} is not a workspace package: {sorted(bins)}"
    assert binary in bins[package], f"{binary} is not a bin target of {package}: {bins[package]}"
    # The binary that leaves the build stage is the one cargo built.
    assert f"target/release/{binary}" in runs


@pytest.mark.parametrize("dockerfile", sorted(IMAGES))
def test_runtime_stage_runs_the_binary_as_non_root_without_a_compiler(dockerfile):
    stages = parse_dockerfile(DOCKER / dockerfile)
    build, runtime = stages[0], stages[-1]
    package, binary = IMAGES[dockerfile]
    assert runtime.base == RUNTIME_IMAGES[dockerfile]
    assert "rust" not in runtime.base and "golang" not in runtime.base
    # The binary is copied from the build stage to /usr/local/bin under its own name.
    copies = [shlex.split(c) for c in runtime.all("COPY")]
    from_build = [c for c in copies if f"--from={build.name}" in c]
    assert len(from_build) == 1, copies
    src, dest = from_build[0][-2], from_build[0][-1]
    assert Path(src).name == binary
    assert dest == f"/usr/local/bin/{binary}"
    assert f"/out/{binary}" == src and f"/out/{binary}" in " ".join(build.all("RUN"))
    entry = json.loads(runtime.all("ENTRYPOINT")[-1])
    assert entry[0] == dest
    # Non-root: a numeric, non-zero user (Kubernetes' runAsNonRoot can check only numbers).
    user = runtime.all("USER")[-1]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, user
    assert int(uid) == 65532
    # No compiler or build tool installed in the runtime stage.
    runs = " ".join(runtime.all("RUN"))
    for m in re.finditer(r"apt-get install ([^&;]*)", runs):
        pkgs = {a for a in shlex.split(m.group(1)) if not a.startswith("-")}
        assert not pkgs & COMPILERS, pkgs
    assert "cargo" not in runs and "rustup" not in runs


def test_runner_image_has_git_and_certificates_only():
    runtime = parse_dockerfile(DOCKER / "job-runner.Dockerfile")[-1]
    runs = " ".join(runtime.all("RUN"))
    installs = re.findall(r"apt-get install ([^&;]*)", runs)
    assert len(installs) == 1
    args = shlex.split(installs[0])
    assert "--no-install-recommends" in args
    assert {a for a in args if not a.startswith("-")} == {"git", "ca-certificates"}
    assert "rm -rf /var/lib/apt/lists/*" in runs


def test_runner_image_provides_the_jobs_command():
    """The Job's container command is RUNNER_COMMAND, resolved on PATH: the image must carry
    the binary under that name in a PATH directory, and run as the Job's UID."""
    command = rust_str_const(JOB_BUILDER_RS, "RUNNER_COMMAND")
    runtime = parse_dockerfile(DOCKER / "job-runner.Dockerfile")[-1]
    dest = shlex.split(runtime.all("COPY")[-1])[-1]
    if "/" in command:
        assert dest == command
    else:
        assert Path(dest).name == command
        # Debian's default PATH (no ENV PATH override in the image).
        assert str(Path(dest).parent) in "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".split(":")
        assert not any(e.startswith("PATH") for e in runtime.all("ENV"))
    uid = int(runtime.all("USER")[-1].split(":")[0])
    assert uid == rust_int_const(JOB_BUILDER_RS, "RUNNER_UID")


def test_dockerignore_keeps_local_state_out():
    entries = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for needed in ["target", ".venv", ".git"]:
        assert needed in entries, needed
    # Nothing the build needs is excluded.
    for needed in ["Cargo.lock", "Cargo.toml", "crds", "operator", "job-runner", "contract"]:
        assert needed not in entries


def test_operator_image_default_tag_is_the_charts_app_version():
    """The Dockerfiles build from the workspace whose version is the chart's appVersion (the
    chart's default image tags)."""
    import yaml
    app_version = yaml.safe_load((ROOT / "charts/repobox-operator/Chart.yaml").read_text())["appVersion"]
    for dockerfile in IMAGES:
        assert f":{app_version} ." in (DOCKER / dockerfile).read_text()

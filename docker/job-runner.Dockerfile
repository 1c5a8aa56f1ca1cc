# syntax=docker/dockerfile:1
# The Repobox job-runner (executor) image: what each runner Job's pod runs. Build from the
# workspace root:
#   docker build -f docker/job-runner.Dockerfile -t ghcr.io/repobox/repobox-job-runner:0.1.0 .

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p repobox-job-runner --bin repobox-job-runner \
 && install -D -m 0755 target/release/repobox-job-runner /out/repobox-job-runner

# Runtime: git (the runner drives the git CLI; it is also its own GIT_ASKPASS helper) and CA
# certificates for HTTPS remotes, nothing else.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends git ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 65532 nonroot \
 && useradd --uid 65532 --gid 65532 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin nonroot
# The operator starts the container with `command: [repobox-job-runner]` (RUNNER_COMMAND in
# operator/src/job_builder.rs), resolved on PATH: the binary must be on PATH under that name.
COPY --from=build /out/repobox-job-runner /usr/local/bin/repobox-job-runner
ENV HOME=/tmp
WORKDIR /tmp
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/repobox-job-runner"]

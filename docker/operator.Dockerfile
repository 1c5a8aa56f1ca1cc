# syntax=docker/dockerfile:1
# The Repobox operator image. Build from the workspace root:
#   docker build -f docker/operator.Dockerfile -t ghcr.io/repobox/repobox-operator:0.1.0 .

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p repobox-operator --bin repobox-operator \
 && install -D -m 0755 target/release/repobox-operator /out/repobox-operator

# Runtime: glibc + libgcc only (the binary uses rustls, no OpenSSL), no shell, user 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/repobox-operator /usr/local/bin/repobox-operator
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/repobox-operator"]
CMD ["run"]

# hookrelay's image: the release binary on a distroless glibc base, run as a non-root user.
# The `cc` variant carries glibc (with its NSS, which the resolver needs) and libgcc; no shell.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY docs ./docs
COPY web ./web
# `hookrelay version` prints these: docker build --build-arg COMMIT=$(git rev-parse --short=12 HEAD)
# --build-arg BUILD_DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ) .
ARG COMMIT=unknown
ARG BUILD_DATE=unknown
# --locked: exactly the dependencies of Cargo.lock, as CI builds them (hack/test.sh).
RUN HOOKRELAY_BUILD_COMMIT=$COMMIT HOOKRELAY_BUILD_DATE=$BUILD_DATE \
    cargo build --release --locked --bin hookrelay

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/hookrelay /hookrelay
# 65532 is distroless' nonroot user; numeric so that runAsNonRoot can verify it.
USER 65532:65532
EXPOSE 8080 9090
ENTRYPOINT ["/hookrelay"]
CMD ["run"]

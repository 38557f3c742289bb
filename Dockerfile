# svidcar image: the binary on a slim Debian base, with iptables for `svidcar redirect`
# (the init container of injected pods). tests/image.rs builds the release binary from
# exactly the files this Dockerfile copies, offline, so the context stays complete.
FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY build build
COPY src src
RUN cargo build --release --locked --bin svidcar && strip target/release/svidcar

FROM debian:bookworm-slim
# iptables (nft and legacy back ends) for `svidcar redirect`; nothing else.
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 1337 --no-create-home --shell /usr/sbin/nologin svidcar
COPY --from=build /src/target/release/svidcar /usr/local/bin/svidcar
# The sidecar runs as 1337 (the uid redirect rules exempt); the init container that
# installs the rules runs as root by its pod securityContext.
USER 1337:1337
ENTRYPOINT ["/usr/local/bin/svidcar"]
CMD ["run", "--config", "/etc/svidcar/config.yaml"]

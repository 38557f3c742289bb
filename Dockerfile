# svidcar sidecar image: a static-ish Rust binary on a slim Debian base.
FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
RUN cargo build --release --locked && strip target/release/svidcar

FROM debian:bookworm-slim
RUN useradd --system --uid 1337 --no-create-home svidcar
COPY --from=build /src/target/release/svidcar /usr/local/bin/svidcar
USER 1337
ENTRYPOINT ["/usr/local/bin/svidcar"]
CMD ["run", "--config", "/etc/svidcar/config.yaml"]

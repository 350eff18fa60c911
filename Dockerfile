# livetable: multi-stage build; the runtime image is Debian slim with a non-root user.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY topics ./topics
COPY web ./web
COPY load ./load
COPY vendor ./vendor
# cdc-gen: the score feed of the demo's high-score board (compose service `scores`)
RUN cargo build --release --locked -p livetable --bin livetable -p livetable-load --bin cdc-gen

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /data livetable \
 && mkdir -p /data && chown livetable /data
COPY --from=build /src/target/release/livetable /usr/local/bin/livetable
COPY --from=build /src/target/release/cdc-gen /usr/local/bin/cdc-gen
USER livetable
ENV LIVETABLE_LISTEN=0.0.0.0:8080 LIVETABLE_DATA_DIR=/data
EXPOSE 8080
VOLUME /data
HEALTHCHECK --interval=5s --timeout=3s --start-period=30s --retries=3 \
  CMD curl -fsS http://127.0.0.1:8080/readyz || exit 1
ENTRYPOINT ["/usr/local/bin/livetable"]

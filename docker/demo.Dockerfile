# syntax=docker/dockerfile:1
# The demo blog (and the mcpage command) for docker-compose.yml.
#
#   docker build -f docker/demo.Dockerfile -t mcpage-demo .

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# rusqlite's `bundled` feature compiles SQLite itself: no database server,
# no libsqlite3 at run time.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p mcpage-demo -p mcpage-cli \
    && mkdir -p /out && cp target/release/mcpage-demo target/release/mcpage /out/

FROM debian:bookworm-slim
RUN useradd --system --create-home --home-dir /data demo
COPY --from=build /out/mcpage-demo /out/mcpage /usr/local/bin/
USER demo
WORKDIR /data
VOLUME /data
EXPOSE 8081
ENTRYPOINT ["mcpage-demo"]
CMD ["--listen", "0.0.0.0:8081", "--db", "/data/mcpage-demo.sqlite3"]

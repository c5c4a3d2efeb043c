# Multi-stage build of the SecureLLM binaries and a CPU llama-server, for a Docker host that can
# pull from a registry. The base images are build arguments (a mirror, a pinned digest):
#   docker build --build-arg RUST_IMAGE=rust:1.95-bookworm --build-arg RUNTIME_IMAGE=debian:bookworm-slim .
# Without a registry, scripts/docker-image.sh builds the same runtime layout from a base made with
# debootstrap and the binaries built on the host (docker/prebuilt.Dockerfile; `make compose-up`).
# (A CUDA llama-server needs a CUDA base image and -DGGML_CUDA=ON; see README "docker-compose".)
ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS build
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-pip python3-venv g++ make \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release -p vram-scheduler -p registry -p backend-manager -p securellm-gateway -p securellm -p securellm-mcp
ENV SECURELLM_CACHE_DIR=/opt/securellm
RUN ./scripts/install-llama-server.sh

FROM ${RUNTIME_IMAGE}
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 securellm \
    && useradd --system --uid 10001 --gid 10001 --home-dir /data --no-create-home --shell /usr/sbin/nologin securellm \
    && mkdir -p /data /models && chown 10001:10001 /data
COPY --from=build /src/target/release/vram-scheduler /src/target/release/registry \
     /src/target/release/backend-manager /src/target/release/securellm-gateway \
     /src/target/release/securellm /src/target/release/securellm-mcp /usr/local/bin/
COPY --from=build /opt/securellm/llama.cpp/bin/llama-server /usr/local/bin/llama-server
ENV LLAMA_SERVER=/usr/local/bin/llama-server \
    SECURELLM_DATA_DIR=/data \
    SECURELLM_INTERNAL_TOKEN_FILE=/data/internal-token
USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
ENV SECURELLM_HEALTH_ADDR=127.0.0.1:50051
HEALTHCHECK --interval=10s --timeout=5s --retries=5 CMD ["/bin/sh", "-c", "exec securellm health \"$SECURELLM_HEALTH_ADDR\""]
CMD ["securellm", "--help"]

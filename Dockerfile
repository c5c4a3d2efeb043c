# Multi-stage build of the SecureLLM binaries and a CPU llama-server.
# (A CUDA llama-server needs a CUDA base image and -DGGML_CUDA=ON; see README "docker-compose".)
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-pip python3-venv g++ make \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release -p vram-scheduler -p registry -p backend-manager -p securellm-gateway -p securellm -p securellm-mcp
ENV SECURELLM_CACHE_DIR=/opt/securellm
RUN ./scripts/install-llama-server.sh

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/vram-scheduler /src/target/release/registry \
     /src/target/release/backend-manager /src/target/release/securellm-gateway \
     /src/target/release/securellm /src/target/release/securellm-mcp /usr/local/bin/
COPY --from=build /opt/securellm/llama.cpp/bin/llama-server /usr/local/bin/llama-server
RUN useradd --system --create-home --home-dir /data securellm
USER securellm
VOLUME ["/data"]

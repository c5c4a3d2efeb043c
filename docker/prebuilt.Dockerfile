# The SecureLLM image without a container registry (scripts/docker-image.sh image): a base made
# on this machine (debootstrap --variant=minbase of the host's Debian release, `docker import`ed;
# scripts/docker-image.sh base) and the binaries built on the host, from a staging folder that
# is the whole build context (bin/: the four services, the securellm CLI, llama-server). Same
# runtime layout, user and healthcheck as the registry-based ../Dockerfile.
ARG BASE_IMAGE=securellm-base:bookworm
FROM ${BASE_IMAGE}
# A fixed uid/gid (10001): the data volume's files and a bind-mounted config keep one owner across
# rebuilds. /data is created owned by it, so a fresh named volume mounted there is writable.
RUN groupadd --system --gid 10001 securellm \
    && useradd --system --uid 10001 --gid 10001 --home-dir /data --no-create-home --shell /usr/sbin/nologin securellm \
    && mkdir -p /data /models && chown 10001:10001 /data
COPY bin/ /usr/local/bin/
ENV LLAMA_SERVER=/usr/local/bin/llama-server \
    SECURELLM_DATA_DIR=/data \
    SECURELLM_INTERNAL_TOKEN_FILE=/data/internal-token
USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
# Each service's compose healthcheck names its own port; this default fits `docker run` of one
# service with SECURELLM_HEALTH_ADDR set (gRPC health, no token needed).
ENV SECURELLM_HEALTH_ADDR=127.0.0.1:50051
HEALTHCHECK --interval=10s --timeout=5s --retries=5 CMD ["/bin/sh", "-c", "exec securellm health \"$SECURELLM_HEALTH_ADDR\""]
CMD ["securellm", "--help"]

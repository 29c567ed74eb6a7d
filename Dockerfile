# The replicad sidecar image: `sidecar run`, configured through SIDECAR_*
# environment variables (docs/deploy.md lists every one; a TOML file mounted
# into the container and passed with `--config FILE` works too).
#
#   docker build -t replicad-sidecar .
#   docker run --rm -e SIDECAR_ORIGIN=http://origin:7070 \
#       -e SIDECAR_DATASETS=user_profile,item_stats -e SIDECAR_TOKEN=... \
#       -v mirror:/var/lib/sidecar -p 7071:7071 replicad-sidecar
#
# Arguments after the image name are appended to `sidecar run`
# (e.g. `--poll-interval 2`). The same image runs the origin by overriding
# the entrypoint (it needs its own data volume and a listen address):
#
#   docker run --rm --entrypoint replicad --no-healthcheck \
#       -e REPLICAD_WRITE_TOKENS=... -e REPLICAD_READ_TOKENS=... \
#       -v origin-data:/var/lib/replicad -p 7070:7070 replicad-sidecar \
#       serve --data /var/lib/replicad --listen 0.0.0.0:7070
#
# Settings set here (override any with -e / env:):
#   SIDECAR_DATA=/var/lib/sidecar      the mirror directory (the volume below)
#   SIDECAR_HEALTH=0.0.0.0:7071        /healthz /readyz /metrics /status
#   SIDECAR_LOG_FORMAT=json            one JSON object per line on stderr
# Settings every deployment must give:
#   SIDECAR_ORIGIN                     origin URL, http(s)://HOST:PORT
#   SIDECAR_DATASETS                   comma-separated dataset names
#   SIDECAR_TOKEN or SIDECAR_TOKEN_FILE  a read token, when the origin wants one
# Optional (defaults in docs/deploy.md): SIDECAR_REPLICA_ID,
#   SIDECAR_POLL_INTERVAL, SIDECAR_MAX_STALENESS, SIDECAR_ACK_INTERVAL,
#   SIDECAR_REQUEST_TIMEOUT, SIDECAR_MAP_SIZE_MB, SIDECAR_MAX_MAP_SIZE_MB,
#   SIDECAR_MAX_READERS, SIDECAR_FILE_MODE, SIDECAR_DURABLE, SIDECAR_HINTS,
#   SIDECAR_CA_FILE, SIDECAR_SERVE_SYNC, SIDECAR_RELAY_READ_TOKENS.

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# The dependencies install from wheels (lmdb, xxhash, msgpack and cramjam
# publish manylinux wheels for CPython 3.11), so the slim image needs no
# compiler; the source tree is removed after the install.
COPY pyproject.toml README.md /tmp/src/
COPY replicad /tmp/src/replicad
COPY sidecar /tmp/src/sidecar
COPY simulations /tmp/src/simulations
RUN pip install /tmp/src && rm -rf /tmp/src

# A fixed numeric uid/gid, so Kubernetes' runAsNonRoot can check it and app
# containers reading the mirror can run as the same user (docs/deploy.md).
RUN groupadd --system --gid 10001 sidecar \
    && useradd --system --uid 10001 --gid sidecar --home-dir /var/lib/sidecar \
        --no-create-home --shell /usr/sbin/nologin sidecar \
    && mkdir -p /var/lib/sidecar /var/lib/replicad \
    && chown sidecar:sidecar /var/lib/sidecar /var/lib/replicad

ENV SIDECAR_DATA=/var/lib/sidecar \
    SIDECAR_HEALTH=0.0.0.0:7071 \
    SIDECAR_LOG_FORMAT=json

# The mirror (LMDB data.mdb + lock.mdb). Apps read it zero-copy, so it is
# shared with them; in Kubernetes an emptyDir with medium: Memory.
VOLUME ["/var/lib/sidecar"]
EXPOSE 7071
USER 10001:10001

# SIGTERM: the sidecar stops; an apply in progress commits first (or never
# began), so the mirror is never half-written. Allow a few seconds
# (`docker stop -t 30`, terminationGracePeriodSeconds) for a large apply.
STOPSIGNAL SIGTERM

# Liveness through the health port given by SIDECAR_HEALTH (python: the slim
# image has no curl). Kubernetes ignores HEALTHCHECK and uses its probes.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('SIDECAR_HEALTH', ':7071').rpartition(':')[2]; urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4)"]

ENTRYPOINT ["sidecar", "run"]
# Reset the base image's CMD (["python3"]), which would otherwise be appended
# to the entrypoint as an argument.
CMD []

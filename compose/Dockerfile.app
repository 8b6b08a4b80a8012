# fleetscribe CPU image: the producer CLI (`python -m producer`), migrations and SQL
# (`python -m db`) and Flower (`python -m worker flower`). No GPU needed.
# Build context is the repository root (compose uses `context: ..`):
#   docker build -f compose/Dockerfile.app -t fleetscribe-app .
#
# Note: torch is a hard dependency in pyproject.toml, so this image installs it too (the
# same PyPI CUDA build as the worker image, a few GB) although the producer and db never
# import it. Splitting the dependencies in pyproject.toml would make this image small.
FROM python:3.12-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /src
# torch + torchvision get a layer of their own so code changes do not download them again.
COPY constraints.txt ./
RUN pip install -c constraints.txt torch torchvision

COPY pyproject.toml README.md ./
# Every package of pyproject.toml's packages.find (tests/test_compose.py checks the list).
COPY config/ config/
COPY video/ video/
COPY broker/ broker/
COPY models/ models/
COPY db/ db/
COPY delivery/ delivery/
COPY metrics/ metrics/
COPY producer/ producer/
COPY worker/ worker/
COPY training/ training/
# The `monitor` extra brings Flower.
RUN pip install -c constraints.txt ".[monitor]" \
    && rm -rf /src

ARG APP_UID=10001
RUN useradd --uid ${APP_UID} --create-home --shell /usr/sbin/nologin fleetscribe \
    && mkdir -p /var/lib/fleetscribe/flower \
    && chown -R fleetscribe:fleetscribe /var/lib/fleetscribe
ENV FLEETSCRIBE_HOME=/var/lib/fleetscribe
USER fleetscribe
WORKDIR /var/lib/fleetscribe

# /var/lib/fleetscribe/flower exists, owned by the user, so the flower-data volume compose
# mounts there starts out writable (Flower's --db).
# Each compose service sets its own command (migrate, flower, producer).
CMD ["python", "-m", "producer", "--help"]

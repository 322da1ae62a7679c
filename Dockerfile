# consul-locker as a container entrypoint.
#
#   docker build -t consul-locker .
#   docker run --rm --network host -e CONSUL_HTTP_ADDR=http://127.0.0.1:8500 consul-locker NAME -- COMMAND [ARG...]
#
# To run your own program under the lock, build your image FROM this one (same Python, venv at /opt/consul-locker,
# on PATH) and keep the ENTRYPOINT: `CMD ["my-job", "--", "/app/run"]`. See README, "Docker".
ARG PYTHON_IMAGE=python:3.12-slim-bookworm

# Build stage: a virtual environment with consul-locker, requests and psutil (binary wheels: no compiler needed).
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
RUN python -m venv --without-pip /opt/consul-locker
COPY pyproject.toml README* LICENSE* ./
COPY shim/ shim/
# The base image's pip installs into the venv; the venv itself gets no pip. Byte-code is compiled here, because the
# non-root user of the final image cannot write __pycache__ next to the sources.
RUN pip --python /opt/consul-locker/bin/python install --no-cache-dir --disable-pip-version-check . \
    && /opt/consul-locker/bin/consul-locker --version

# Final stage: the same slim base (the venv's interpreter symlinks point into it), the venv, a non-root user.
FROM ${PYTHON_IMAGE}
ARG VERSION=0.2.0
LABEL org.opencontainers.image.title="consul-locker" \
      org.opencontainers.image.description="PID-1-safe entrypoint that runs a command on one machine at a time under a Consul lock" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="MIT"
RUN groupadd --system --gid 10001 consul-locker \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin consul-locker
COPY --from=build /opt/consul-locker /opt/consul-locker
ENV PATH="/opt/consul-locker/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /tmp
USER 10001:10001
# No HEALTHCHECK: the container is healthy exactly when its command is, and only the command's image knows how to
# ask it. consul-locker itself needs no probe: it exits (75) when it loses the lock.
# consul-locker runs as PID 1: it forwards signals, reaps zombies and cleans the process tree, so no tini is needed.
ENTRYPOINT ["consul-locker"]
CMD ["--help"]

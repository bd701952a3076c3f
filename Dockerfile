# The Person API: gunicorn + Falcon on Debian's own Python, as UID 10001 on a read-only root.
# Build:  docker build -t personapi:latest .
# Writes only /data (the SQLite file: mount a volume there) and /tmp (mount a tmpfs).
# It carries litestream (requirements.txt), which deploy.yaml runs beside the API to
# replicate /data/persons.db (docs/backup.md); /replica is the demo replica's volume.

# --- build: the virtualenv, with pip, then without it ---------------------------------------
FROM debian:bookworm-slim AS build

# No apt version pins (DL3008): bookworm's security updates replace the exact versions,
# so a pin would break the build instead of patching it.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*

# Behind a TLS-intercepting proxy, lend pip its CA for this step only (it is not kept):
#   docker build --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt ...
COPY requirements.txt /tmp/requirements.txt
RUN --mount=type=secret,id=ca,target=/run/secrets/ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check -r /tmp/requirements.txt \
 && /opt/venv/bin/pip uninstall --yes --quiet pip setuptools

# --- runtime: Python, the venv and the app; no pip, no apt lists, no build stage ------------
FROM debian:bookworm-slim

# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 personapi \
 && useradd --no-log-init --uid 10001 --gid 10001 --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin personapi \
 && install -d -o 10001 -g 10001 -m 0750 /data /replica

COPY --from=build /opt/venv /opt/venv
WORKDIR /app
# The app is the top-level modules and gunicorn.conf.py (.dockerignore keeps the rest out).
COPY *.py ./
# Compiled now: the read-only root cannot take __pycache__ at run time.
RUN python3 -m compileall -q /app

# GUNICORN_CMD_ARGS, not a CMD flag, sets the address, so `-e GUNICORN_CMD_ARGS=...` can move it.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DATABASE_URL=sqlite:////data/persons.db \
    GUNICORN_CMD_ARGS="--bind 0.0.0.0:8000"

USER 10001:10001
VOLUME ["/data"]
EXPOSE 8000
# config.py checks every setting (gunicorn reads WEB_CONCURRENCY before gunicorn.conf.py can),
# then execs gunicorn: in exec form gunicorn is PID 1 and gets SIGTERM itself, which is its
# graceful shutdown.
CMD ["python", "config.py", "gunicorn", "--config", "gunicorn.conf.py"]

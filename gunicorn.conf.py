"""gunicorn settings for `gunicorn personapi:app` (read from the working directory).

Command-line flags and GUNICORN_CMD_ARGS override any of these.
"""

import multiprocessing
import os
import shutil
import sys
import tempfile

import logs
from config import Config

app_config = Config.from_env_or_exit()  # not "config": gunicorn reads that name as a setting

# prometheus-client's multiprocess mode: each worker writes its samples to files in this
# directory, one per instance (named by the master's pid), and /metrics adds them up.
# prometheus-client reads the variable when first imported: it is set here, before any
# module imports it, and the workers inherit it.
metrics_directory = os.path.join(tempfile.gettempdir(), f'personapi-metrics-{os.getpid()}')
if app_config.metrics:
    os.environ['PROMETHEUS_MULTIPROC_DIR'] = metrics_directory
else:
    os.environ.pop('PROMETHEUS_MULTIPROC_DIR', None)

wsgi_app = 'personapi:app'
bind = '127.0.0.1:8000'
# One process per core, several threads each: measured with `make bench` on 2 cores, GET
# went from 0.34 to 0.67 of the ceiling against 2 processes per core with 4 threads, and
# fewer processes means fewer writers racing for SQLite's lock. gthread rather than sync:
# keep-alive, and one slow client does not hold a whole process.
workers = app_config.web_concurrency or multiprocessing.cpu_count()
# gthread, with request heads read in its event loop and a safe Ctrl-C: see worker.py.
worker_class = 'worker.Worker'
threads = 8
keepalive = 5
timeout = 30
graceful_timeout = 20

# No control socket: two instances on one machine would fight over its one default
# path, and a read-only root filesystem cannot hold it.
control_socket_disable = True

# Bounds on what a client may send before the app sees it.
limit_request_line = 4094
limit_request_fields = 50
limit_request_field_size = 8190

# The proxies trusted with X-Forwarded-For/-Proto: the app's rate limiter reads the same list.
forwarded_allow_ips = app_config.forwarded_allow_ips

# Access log: client, method, path (no query string), status, duration, request id; never a
# body. Its lines, gunicorn's and the app's own messages are all in LOG_FORMAT (logs.py).
accesslog = '-'
logger_class = logs.GunicornLogger
logs.configure(app_config.log_format)


def on_starting(server):
    """Create or migrate the schema and make an empty metrics directory in the master,
    once, before any worker exists."""
    import models

    models.connect(app_config.database_url)
    models.migrate()
    with models.db.connection_context():
        models.truncate_wal()  # what a crash left of an erasure in the WAL goes now
    if app_config.metrics:
        shutil.rmtree(metrics_directory, ignore_errors=True)  # a former instance's samples
        os.makedirs(metrics_directory, mode=0o700)


def child_exit(server, worker):
    """Drop the live gauges of a worker that is gone (its counts stay in the sums)."""
    if app_config.metrics:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    shutil.rmtree(metrics_directory, ignore_errors=True)


def post_worker_init(worker):
    """Start this worker's mail courier (after the fork, so its connection is its own) and
    its metrics' flushes."""
    import metrics
    import personapi

    personapi.courier.start()
    if app_config.metrics:
        metrics.start_flushing()


def worker_exit(server, worker):
    """Let the courier finish the mail in hand on a graceful stop (Ctrl-C stops at once: a
    mail in hand then waits out its lease and is sent again, once); count the last requests."""
    personapi = sys.modules.get('personapi')
    if personapi is not None and 'courier' in vars(personapi):
        personapi.courier.stop(timeout=1.0 if getattr(worker, 'stopping_at_once', False) else None)
    if 'metrics' in sys.modules:
        sys.modules['metrics'].flush()

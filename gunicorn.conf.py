"""gunicorn settings for `gunicorn personapi:app` (read from the working directory).

Command-line flags and GUNICORN_CMD_ARGS override any of these.
"""

import multiprocessing
import os
import resource
import shutil
import socket
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

# RATE_LIMIT_STORAGE=instance://: the workers count writes in one file of this instance's
# (ratelimit.py), named like the metrics directory.
rate_limit_file = os.path.join(tempfile.gettempdir(), f'personapi-rate-limit-{os.getpid()}.db')

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


def _connections_per_worker(files_of_its_own=128):
    """Each connection a worker holds is a file descriptor, so a worker holds as many as
    the process may open, less a margin for its own files (database, logs, pipes, the
    mail relay). The soft limit is raised to the hard one first, as Go's runtime does at
    start: the soft limit stays low only for programs that use select(), which nothing
    here does (gunicorn's workers use epoll). A full worker closes its longest-idle
    connection for a new one (worker.py)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):  # an unlimited hard limit is more than the kernel allows
            pass
    return max(threads, soft - files_of_its_own)


worker_connections = _connections_per_worker()
timeout = 30
graceful_timeout = 20

# Each worker listens on a socket of its own on the port (SO_REUSEPORT) and the kernel
# shares new connections out evenly. On one shared socket the worker that woke first took
# them: a burst of keep-alive clients could all land on one worker while the other idled
# (seen in `make bench`: 32 connections of 32 on one worker, a quarter of the speed).
# on_starting turns it off for what cannot be shared so (a Unix socket, port 0) and
# refuses a port that something else already listens on.
reuse_port = True

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
    """Settle how to listen; check the database, create or migrate the schema and make an
    empty metrics directory in the master, once, before any worker exists."""
    import backup
    import models
    import ratelimit

    ratelimit.share_between_workers(rate_limit_file)
    if server.cfg.reuse_port:
        _share_port_or_not(server.cfg)
    if server.cfg.reuse_port:  # gunicorn's own "Listening at" line has no socket to name
        urls = [f'http://[{host}]:{port}' if ':' in host else f'http://{host}:{port}'
                for host, port in server.cfg.address]
        server.log.info('Listening at: %s (a socket per worker, SO_REUSEPORT)', ', '.join(urls))

    models.connect(app_config.database_url)
    # Read-only, before anything opens the file for writing: a corrupt file is not served.
    checked_in = backup.check_at_start(app_config.database_url)
    if checked_in is not None:
        server.log.info('Database checked (quick_check) in %.2f s', checked_in)
    models.migrate()
    with models.db.connection_context():
        models.truncate_wal()  # what a crash left of an erasure in the WAL goes now
    if app_config.metrics:
        shutil.rmtree(metrics_directory, ignore_errors=True)  # a former instance's samples
        os.makedirs(metrics_directory, mode=0o700)


def _share_port_or_not(cfg):
    """Keep SO_REUSEPORT for TCP addresses with a port; it would also let a second instance
    share the port unnoticed, so a port something already listens on stops the start."""
    if not all(isinstance(address, tuple) and address[1] for address in cfg.address):
        cfg.set('reuse_port', False)
        return
    for host, port in cfg.address:
        family = socket.AF_INET6 if ':' in host else socket.AF_INET
        with socket.socket(family) as probe:
            # SO_REUSEADDR, not SO_REUSEPORT: closed connections' TIME_WAIT do not count,
            # a listening socket does.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError:
                sys.exit(f'personapi: {host}:{port} is in use; stop what listens there, '
                         f'or bind another port')


def child_exit(server, worker):
    """Drop the live gauges of a worker that is gone (its counts stay in the sums)."""
    if app_config.metrics:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    import ratelimit

    shutil.rmtree(metrics_directory, ignore_errors=True)
    ratelimit.remove_files(rate_limit_file)


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
    mail in hand then waits out its lease and is sent again, once); count the last requests.
    A worker whose SQLite file was replaced ends without closing its connections: SQLite
    would delete the -wal and -shm at the path, the new file's, when the last one closes."""
    models = sys.modules.get('models')
    replaced = models is not None and models.database_file_replaced()
    personapi = sys.modules.get('personapi')
    if personapi is not None and 'courier' in vars(personapi) and not replaced:
        personapi.courier.stop(timeout=1.0 if getattr(worker, 'stopping_at_once', False) else None)
    if 'metrics' in sys.modules:
        sys.modules['metrics'].flush()
    if replaced:
        sys.stderr.flush()
        os._exit(0)

"""The rate limit's counts: where they live, and what becomes of a write when they cannot
be reached.

RATE_LIMIT_STORAGE=instance:// (the default) keeps them in a small SQLite file that every
worker of one instance shares, so that RATE_LIMIT holds for the instance however many
workers it has: gunicorn.conf.py names the file after the master's pid, in the temporary
folder, and empties it at start. A process outside gunicorn is an instance of its own, with
a file of its own. redis:// keeps them in Redis, shared by every replica.

When the storage cannot be reached, writes are let through unchecked (fail-open): a
rate-limit store that fails must not refuse every write of every replica. Each one is
counted in /metrics, a warning is logged at most once a minute, /readyz says so, and one
write every few seconds tries the storage again.
"""

import contextlib
import logging
import math
import os
import sqlite3
import tempfile
import threading
import time
import weakref

import limits
import limits.storage
import limits.strategies

from models import WriterQueue

log = logging.getLogger('personapi')

INSTANCE = 'instance://'
# The former default's name: it counted per worker, so a limit grew with the workers; it
# means the instance now, as an operator who set it meant.
INSTANCE_ALIASES = (INSTANCE, 'memory://')
# Redis must answer within this, or the write goes unchecked: a Redis that stopped without
# closing its connections would otherwise hold every write until the kernel gives up.
REDIS_TIMEOUT = 0.5
RETRY_SECONDS = 5.0  # while the storage fails, one write in this long tries it again
WARN_SECONDS = 60.0  # at most one warning in this long, per process
PURGE_SECONDS = 60.0  # how often a process deletes every client's expired counts

_instance_file = None  # named by gunicorn's master, before it forks the workers


def share_between_workers(path):
    """Make `path` the instance's file, emptied of a former instance's counts: called in
    gunicorn's master before it forks, so every worker counts in it."""
    global _instance_file
    remove_files(path)
    _instance_file = path


def remove_files(path):
    for suffix in ('', '-wal', '-shm', '-lock'):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path + suffix)


class InstanceStorage(limits.storage.Storage, limits.storage.MovingWindowSupport):
    """A `limits` storage over a SQLite file, one row per counted write, so that the
    processes that open the file share the counts: moving windows (RateLimit's) and fixed
    windows alike. Writers queue on a lock and an flock, as models.py's do; counts are not
    worth an fsync (a crash loses at most the last ones)."""

    STORAGE_SCHEME = None  # made by open_storage(), not by limits from a URI

    def __init__(self, path=None):
        super().__init__()
        if path is None:  # this process alone: a file of its own, removed when it ends
            handle, path = tempfile.mkstemp(prefix='personapi-rate-limit-', suffix='.sqlite')
            os.close(handle)
            owner = os.getpid()
            weakref.finalize(self, lambda: os.getpid() == owner and remove_files(path))
        self.path = path
        self._writers = WriterQueue()
        self._writers.use_file(f'{path}-lock')
        self._local = threading.local()
        self._purged_at = 0.0

    @property
    def base_exceptions(self):
        return (sqlite3.Error, OSError)

    def _connection(self):
        """This thread's connection (a forked process opens its own)."""
        opened = getattr(self._local, 'opened', None)
        if opened is None or opened[0] != os.getpid():
            connection = sqlite3.connect(self.path, isolation_level=None, timeout=5,
                                         check_same_thread=False)
            connection.execute('PRAGMA journal_mode = WAL')
            connection.execute('PRAGMA synchronous = OFF')
            with self._writers:
                connection.execute('CREATE TABLE IF NOT EXISTS hits '
                                   '(key TEXT NOT NULL, at REAL NOT NULL, expires REAL NOT NULL)')
                connection.execute('CREATE INDEX IF NOT EXISTS hits_by_key ON hits (key, expires)')
                connection.execute('CREATE INDEX IF NOT EXISTS hits_by_expiry ON hits (expires)')
            opened = self._local.opened = (os.getpid(), connection)
        return opened[1]

    @contextlib.contextmanager
    def _writing(self):
        """A write transaction, and time.time() at its start."""
        with self._writers:
            connection = self._connection()
            connection.execute('BEGIN IMMEDIATE')
            try:
                now = time.time()
                if now - self._purged_at >= PURGE_SECONDS:
                    self._purged_at = now
                    connection.execute('DELETE FROM hits WHERE expires <= ?', (now,))
                yield connection, now
            except BaseException:
                connection.execute('ROLLBACK')
                raise
            connection.execute('COMMIT')

    @staticmethod
    def _live(connection, key, now):
        """(oldest hit, number of hits, first expiry) of `key` still counting at `now`."""
        return connection.execute('SELECT min(at), count(*), min(expires) FROM hits '
                                  'WHERE key = ? AND expires > ?', (key, now)).fetchone()

    @staticmethod
    def _add(connection, key, now, expires, amount):
        connection.executemany('INSERT INTO hits (key, at, expires) VALUES (?, ?, ?)',
                               [(key, now, expires)] * amount)

    # The moving window: each hit counts for `expiry` seconds from its own time.

    def acquire_entry(self, key, limit, expiry, amount=1):
        if amount > limit:
            return False
        with self._writing() as (connection, now):
            if self._live(connection, key, now)[1] + amount > limit:
                return False
            self._add(connection, key, now, now + expiry, amount)
            return True

    def get_moving_window(self, key, limit, expiry):
        now = time.time()
        oldest, count, _ = self._live(self._connection(), key, now)
        return (oldest if count else now), count

    # The fixed window: every hit counts until `expiry` seconds after the window's first.

    def incr(self, key, expiry, amount=1):
        with self._writing() as (connection, now):
            _, count, expires = self._live(connection, key, now)
            self._add(connection, key, now, expires or now + expiry, amount)
            return count + amount

    def get(self, key):
        return self._live(self._connection(), key, time.time())[1]

    def get_expiry(self, key):
        now = time.time()
        return self._live(self._connection(), key, now)[2] or now

    def clear(self, key):
        with self._writing() as (connection, _):
            connection.execute('DELETE FROM hits WHERE key = ?', (key,))

    def reset(self):
        with self._writing() as (connection, _):
            return connection.execute('DELETE FROM hits').rowcount

    def check(self):
        try:
            self._connection().execute('SELECT count(*) FROM hits').fetchone()
        except self.base_exceptions:
            return False
        return True


def open_storage(uri):
    """The storage RATE_LIMIT_STORAGE names."""
    if uri in INSTANCE_ALIASES:
        return InstanceStorage(_instance_file)
    return limits.storage.storage_from_string(uri, socket_timeout=REDIS_TIMEOUT,
                                              socket_connect_timeout=REDIS_TIMEOUT)


class Limiter:
    """Writes per client in a moving window of RATE_LIMIT, counted in the storage; when
    the storage cannot be reached, every write is allowed and `count_unchecked()` called
    (see the module's docstring)."""

    def __init__(self, limit, storage, count_unchecked):
        self.limit = limits.parse(limit)
        self._storage = storage
        self._count_unchecked = count_unchecked
        self._limiter = limits.strategies.MovingWindowRateLimiter(storage)
        self._lock = threading.Lock()
        self.down_since = None  # time.monotonic() when the storage stopped answering
        self._retry_at = 0.0
        self._warned_at = -math.inf

    def hit(self, client):
        """Count a write of `client`: None if it is allowed, else the seconds to wait."""
        if self._may_try():
            try:
                if self._limiter.hit(self.limit, 'writes', client):
                    self._answered()
                    return None
                reset_at = self._limiter.get_window_stats(self.limit, 'writes', client).reset_time
                self._answered()
                return max(1, math.ceil(reset_at - time.time()))
            except Exception as error:  # the storage's own errors, whichever it is
                self._failed(type(error).__name__)
        self._count_unchecked()
        return None

    def storage_answers(self):
        """Ask the storage now (for /readyz); whether it answered."""
        if self._storage.check():
            self._answered()
            return True
        self._failed('no answer to a check')
        return False

    def _may_try(self):
        if self.down_since is None:
            return True
        with self._lock:
            now = time.monotonic()
            if now < self._retry_at:
                return False
            self._retry_at = now + RETRY_SECONDS
            return True

    def _failed(self, reason):
        with self._lock:
            now = time.monotonic()
            if self.down_since is None:
                self.down_since, self._retry_at = now, now + RETRY_SECONDS
            if now - self._warned_at >= WARN_SECONDS:
                self._warned_at = now
                log.warning('rate limit storage unreachable (%s): writes are let through '
                            'unlimited until it answers', reason)

    def _answered(self):
        if self.down_since is None:
            return
        with self._lock:
            if self.down_since is not None:
                log.warning('rate limit storage answers again after %.0f s: writes are '
                            'limited again', time.monotonic() - self.down_since)
                self.down_since = None

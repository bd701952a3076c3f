"""Storage: the Person, IdempotencyKey, Outbox and ServiceKey models, bound at start-up to
DATABASE_URL, and the schema's migrations.

`python models.py migrate` creates the schema or brings an older one up to date; gunicorn's
master does it before forking. `python models.py check | backup FILE | restore FILE` are
backup.py's.
"""

import collections
import contextlib
import datetime
import errno
import fcntl
import functools
import hashlib
import logging
import math
import mmap
import os
import queue
import secrets
import sqlite3
import sys
import tempfile
import threading
import time

import peewee
from playhouse import db_url
from playhouse.pool import PooledDatabase

db = peewee.DatabaseProxy()
log = logging.getLogger('personapi.models')

# The database's failures, not a request's: the API answers them with 503 (so too a corrupt
# SQLite file: see is_database_failure). sqlite3's own escape peewee from a cursor's fetch.
DATABASE_DOWN = (peewee.OperationalError, peewee.InterfaceError, sqlite3.OperationalError)

MAX_NAME_LENGTH = 100
MAX_EMAIL_LENGTH = 254  # RFC 5321's limit on a forward path

# WAL lets readers run beside the writer; FULL makes every commit survive a power cut;
# IMMEDIATE takes the write lock at BEGIN, so two writers queue on the busy timeout
# instead of deadlocking and failing with "database is locked".
SQLITE_OPTIONS = {
    # secure_delete zeroes what a DELETE removes, so an erased person leaves no bytes behind.
    'pragmas': {'journal_mode': 'wal', 'synchronous': 'full', 'foreign_keys': 1,
                'secure_delete': 1},
    'timeout': 15,
    'lock_type': 'IMMEDIATE',
}
# A dead server must fail a request quickly, not hang it. A pooled connection idle for
# 5 minutes is closed, not handed to a request after a server or a proxy dropped it.
SERVER_OPTIONS = {
    'postgres': {'connect_timeout': 5, 'stale_timeout': 300},
    'mysql': {'connect_timeout': 5, 'read_timeout': 15, 'write_timeout': 15,
              'stale_timeout': 300},
}


class BaseModel(peewee.Model):
    class Meta:
        database = db


class IdField(peewee.AutoField):
    """An id that no row gets twice, not even after the newest row is deleted: PostgreSQL's
    sequences and InnoDB's counter never go back, SQLite does unless told AUTOINCREMENT."""

    def ddl(self, ctx):
        ddl = super().ddl(ctx)
        return peewee.NodeList((ddl, peewee.SQL('AUTOINCREMENT'))) if is_sqlite() else ddl


class Person(BaseModel):
    id = IdField()
    first_name = peewee.CharField(max_length=MAX_NAME_LENGTH)
    last_name = peewee.CharField(max_length=MAX_NAME_LENGTH)
    email = peewee.CharField(max_length=MAX_EMAIL_LENGTH)
    # See email_key(): its unique index makes the database itself refuse a second person
    # with the same address in another case.
    email_key = peewee.FixedCharField(max_length=64, unique=True)
    # Counts the row's changes: the API's ETag. DEFAULT in the DDL, so that adding the
    # column to a table gives the rows already there their first version.
    version = peewee.IntegerField(default=1, constraints=[peewee.SQL('DEFAULT 1')])


class IdempotencyKey(BaseModel):
    """The outcome of a POST sent with an Idempotency-Key, written in the same transaction
    as its person and erased with it."""

    key_hash = peewee.FixedCharField(max_length=64, primary_key=True)  # see digest()
    fingerprint = peewee.FixedCharField(max_length=64)  # digest() of the request's body
    person = peewee.ForeignKeyField(Person, on_delete='CASCADE')
    response = peewee.TextField()  # the 201's body, as sent
    created_at = peewee.DoubleField(index=True)

    @classmethod
    def find(cls, key_hash, *, not_before):
        return cls.get_or_none(cls.key_hash == key_hash, cls.created_at >= not_before)

    @classmethod
    def purge(cls, *, before):
        """Delete the records older than `before`: read first, so that the usual case,
        nothing to purge, writes nothing and takes no lock."""
        expired = cls.created_at < before
        if cls.select(cls.key_hash).where(expired).exists():
            with write_transaction():
                cls.delete().where(expired).execute()


# A claimed mail and what it is sent with; tuples: building models costs more than the mail.
ClaimedMail = collections.namedtuple(
    'ClaimedMail', 'claim id attempts created_at email first_name last_name')


class Outbox(BaseModel):
    """One welcome mail to send, written in the same transaction as its person.

    It names the person, never copies them: the mail goes to the address and names the
    person has when it is sent, and deleting the person deletes the mail (no mail after
    an erasure). A sent mail's row is deleted; a failed one is kept, without personal data,
    for MAIL_FAILED_RETENTION.
    """

    PENDING, FAILED = 'pending', 'failed'

    person = peewee.ForeignKeyField(Person, on_delete='CASCADE', index=True)
    status = peewee.CharField(max_length=8, default=PENDING)
    created_at = peewee.DoubleField(default=time.time)  # the give-up clock starts here
    # When the row may next be claimed: a claim moves it forward by the lease, so a
    # sender that dies mid-send gives the row back when the lease runs out.
    due_at = peewee.DoubleField(default=time.time)
    attempts = peewee.IntegerField(default=0)
    claim = peewee.CharField(max_length=32, default='')
    last_error = peewee.CharField(max_length=200, default='')
    failed_at = peewee.DoubleField(null=True)

    class Meta:
        indexes = ((('status', 'due_at'), False),)

    @classmethod
    def claim_due(cls, claim, *, now, lease, limit):
        """Lease up to `limit` due mails to `claim`: one conditional UPDATE, so two senders
        racing for a row cannot both win it, on any engine. Returns them as ClaimedMail,
        with their person's current address and names.

        Its SQL is built once (see _statement): peewee would take longer to build it than
        the database to run it, for every batch."""
        due_sql = _statement('due_mails', lambda: cls.select(cls.id).where(
            cls.status == cls.PENDING, cls.due_at <= 0).order_by(cls.due_at).limit(1))
        due = [row_id for (row_id,) in db.execute_sql(due_sql, (cls.PENDING, now, limit))]
        if not due:
            return []
        claim_sql = _statement(('claim', len(due)), lambda: cls.update(
            claim='', due_at=0, attempts=cls.attempts + peewee.SQL('1')).where(
            cls.id.in_([0] * len(due)), cls.status == cls.PENDING, cls.due_at <= 0))
        with write_transaction():  # peewee sets the columns in the model's order
            db.execute_sql(claim_sql, (now + lease, claim, *due, cls.PENDING, now))
        claimed_sql = _statement('claimed_mails', lambda: cls.select(
            cls.id, cls.attempts, cls.created_at, Person.email, Person.first_name,
            Person.last_name).join(Person).where(cls.claim == '').order_by(cls.id))
        return [ClaimedMail(claim, *row) for row in db.execute_sql(claimed_sql, (claim,))]

    @classmethod
    def next_due_at(cls):
        return cls.select(peewee.fn.MIN(cls.due_at)).where(cls.status == cls.PENDING).scalar()

    @classmethod
    def settle(cls, claim, *, sent=(), extend_to=None):
        """Delete the `sent` mails; move the lease of the rest of `claim` to `extend_to`."""
        if not sent and extend_to is None:
            return
        with write_transaction():
            if sent:
                cls.delete().where(cls.id.in_(list(sent))).execute()
            if extend_to is not None:
                cls.update(due_at=extend_to).where(cls.claim == claim).execute()

    @classmethod
    def mark_failed(cls, row_id, error):
        cls._end_claim(cls.id == row_id, status=cls.FAILED, failed_at=time.time(),
                       last_error=error[:200])

    @classmethod
    def reschedule(cls, row_id, due_at, error):
        cls._end_claim(cls.id == row_id, due_at=due_at, last_error=error[:200])

    @classmethod
    def release(cls, claim, row_ids):
        """Hand back claimed rows that were not tried (the sender is stopping)."""
        if row_ids:
            cls._end_claim(cls.id.in_(row_ids) & (cls.claim == claim), due_at=time.time())

    @classmethod
    def retry_failed(cls, row_ids=None):
        """Make failed mails (all, or those of `row_ids`) pending again, due now; returns
        how many. Their give-up clock starts afresh."""
        which = cls.status == cls.FAILED
        if row_ids is not None:
            which &= cls.id.in_(list(row_ids))
        now = time.time()
        with write_transaction():
            return cls.update(status=cls.PENDING, due_at=now, created_at=now, attempts=0,
                              failed_at=None, claim='').where(which).execute()

    @classmethod
    def purge_failed(cls, older_than):
        """Delete the failed mails that failed before `older_than`; returns how many."""
        with write_transaction():
            return cls.delete().where(cls.status == cls.FAILED,
                                      cls.failed_at < older_than).execute()

    @classmethod
    def _end_claim(cls, which, **changes):
        with write_transaction():
            cls.update(claim='', **changes).where(which).execute()


class SchemaVersion(BaseModel):
    """One row per schema version the database has reached; the highest is its schema."""

    version = peewee.IntegerField(primary_key=True)
    applied_at = peewee.DoubleField(default=time.time)

    class Meta:
        table_name = 'schema_version'


class ServiceKey(BaseModel):
    """A random key the service made for itself (see service_key()): kept in the database,
    so that every worker and replica has the same one, and it outlives restarts."""

    name = peewee.CharField(max_length=32, primary_key=True)
    value = peewee.FixedCharField(max_length=64)  # 32 random bytes, in hex

    class Meta:
        table_name = 'service_key'


CURSOR_KEY = 'list-cursor'  # signs the cursors of GET /person's pages
SERVICE_KEYS = (CURSOR_KEY,)


MODELS = [Person, IdempotencyKey, Outbox, SchemaVersion, ServiceKey]

# The hot paths' SQL, built once per bound database (connect() empties it): peewee's query
# builder costs more than running the statement (30 times more for the lookup by id).
_statements = {}


class WriterLockTimeout(peewee.OperationalError):
    """A write waited for the writers' queue past its deadline; the message names who holds
    it, never data."""


class WriterQueueError(peewee.OperationalError):
    """The writers' queue's file cannot be used: its filesystem fails."""


# The filesystem's errors, in the words SQLite's get (see SQLITE_ERROR_MEANINGS).
OS_ERROR_MEANINGS = {errno.ENOSPC: 'the disk is full', errno.EROFS: 'the filesystem is read-only',
                     errno.EIO: 'I/O error'}


class WriterQueue:
    """SQLite admits one writer at a time, and its busy handler sleeps up to 100 ms per
    try. Writers queue here instead, where the next one wakes at once: the threads of a
    process on a lock, the processes on an flock of a file beside the database (its name
    and `-lock`; it holds nothing). Re-entrant: a nested write becomes a savepoint.

    A turn is waited for until a deadline, the database's busy timeout: past it the write
    fails with WriterLockTimeout, and the log names the process holding the queue (a
    process stopped, or stuck, while it holds it would otherwise stop every write)."""

    def __init__(self):
        self._path, self._fd, self._timeout = None, None, SQLITE_OPTIONS['timeout']
        self._last_report = None  # (message, when) of the last timeout logged
        self._waiting_fds = set()  # descriptors of _FlockWaiters still waiting
        self._start_afresh()
        os.register_at_fork(after_in_child=self._start_afresh)

    def _start_afresh(self):
        """In a new process: no thread of the parent's holds the lock, and the parent's file
        descriptors would share the parent's flock (its waiters' too)."""
        self._threads = threading.RLock()
        self._depth = 0  # of the holding thread's nesting; guarded by _threads
        self._forget_file()
        for fd in list(self._waiting_fds):
            os.close(fd)
        self._waiting_fds.clear()

    def use_file(self, path, timeout=SQLITE_OPTIONS['timeout']):
        """Queue the processes on `path` (None: this process alone, for `:memory:`), each
        waiting `timeout` seconds at most."""
        with self._threads:
            self._forget_file()
            self._path, self._timeout = path, timeout

    def _forget_file(self):
        if self._fd is not None:
            os.close(self._fd)
        self._fd = None

    def __enter__(self):
        self.take()

    def __exit__(self, *exc_info):
        self.release()

    def take(self, wait=None):
        """Wait for this thread's turn, `wait` seconds at most (default: the busy timeout,
        and a timeout is logged; a shorter wait is a probe's, which logs nothing)."""
        seconds = self._timeout if wait is None else wait
        deadline = time.monotonic() + seconds
        if not self._threads.acquire(timeout=seconds):
            raise self._too_late(seconds, report=wait is None)
        try:
            if self._depth == 0 and self._path:
                self._lock_file(deadline, seconds, report=wait is None)
        except BaseException as error:
            self._threads.release()
            if isinstance(error, OSError):
                meaning = OS_ERROR_MEANINGS.get(error.errno) or os.strerror(error.errno)
                raise WriterQueueError(f'{self._path}: {meaning}') from None
            raise
        self._depth += 1

    def release(self):
        self._depth -= 1
        if self._depth == 0 and self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._threads.release()

    def _lock_file(self, deadline, seconds, report):
        if self._fd is None:
            self._fd = self._open()
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the usual case: one call
            return
        except BlockingIOError:
            pass
        # Another process has its turn: wait in a thread, which a deadline can give up on
        # (a blocking flock cannot be interrupted, and polling would not wake at once).
        waiter = _FlockWaiter(self._open(), self._waiting_fds)
        if not waiter.granted(deadline - time.monotonic()):
            raise self._too_late(seconds, report)
        os.close(self._fd)
        self._fd = waiter.fd  # the lock is held through the waiter's descriptor from now on

    def _open(self):
        return os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def _too_late(self, seconds, report):
        holders = ', '.join(f'process {pid}' for pid in self._holders()) or (
            f'a thread of this process ({os.getpid()})')
        error = WriterLockTimeout(f'a write waited {seconds:g} s for the SQLite writers\' '
                                  f'queue: {holders} holds it, stopped or stuck in a write')
        now = time.monotonic()
        if report and not (self._last_report and self._last_report[0] == str(error)
                           and now - self._last_report[1] < seconds):
            self._last_report = (str(error), now)  # once per holder and deadline, not per write
            log.error('%s; writes answer 503 meanwhile', error)
        return error

    def _holders(self):
        """The processes /proc/locks lists as holding the queue's flock (Linux; read only
        after a timeout). Its lines: `1: FLOCK ADVISORY WRITE <pid> <maj>:<min>:<inode> ...`;
        those of waiters read `1: -> FLOCK ...`."""
        try:
            status = os.stat(self._path)
            with open('/proc/locks') as locks:
                lines = locks.read().splitlines()
        except (OSError, TypeError):  # no file (`:memory:`), or no /proc
            return []
        file = f'{os.major(status.st_dev):02x}:{os.minor(status.st_dev):02x}:{status.st_ino}'
        return [int(fields[4]) for fields in map(str.split, lines)
                if fields[1:2] == ['FLOCK'] and fields[5:6] == [file]]


class _FlockWaiter:
    """An exclusive flock of `fd` (a descriptor of its own, so a lock of its own) taken by a
    thread of its own, while the thread that wants it waits with a deadline. A wait given up
    leaves the descriptor to the thread, which closes it, letting the lock go, as soon as
    it is granted. `waiting` holds the descriptors in flight, for a fork to close."""

    def __init__(self, fd, waiting):
        self.fd, self._waiting = fd, waiting
        self._outcome = threading.Condition()
        self._granted = self._given_up = False
        waiting.add(fd)
        threading.Thread(target=self._wait, name='sqlite-writers-flock', daemon=True).start()

    def _wait(self):
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        with self._outcome:
            self._waiting.discard(self.fd)
            if self._given_up:
                os.close(self.fd)
            else:
                self._granted = True
                self._outcome.notify()

    def granted(self, timeout):
        """Whether the lock came within `timeout` seconds; if not, the wait is given up."""
        with self._outcome:
            self._outcome.wait_for(lambda: self._granted, max(0.0, timeout))
            self._given_up = not self._granted
            return self._granted


_sqlite_writers = WriterQueue()


# --- The database's failures, in words ------------------------------------------------------

# What SQLite's storage errors mean, by the start of the error's name (SQLITE_IOERR_WRITE is
# an SQLITE_IOERR); see SQLite's result codes.
SQLITE_ERROR_MEANINGS = (
    ('SQLITE_FULL', 'the disk is full'),
    ('SQLITE_READONLY', 'the filesystem or file is read-only'),
    ('SQLITE_IOERR', 'I/O error'),
    ('SQLITE_CORRUPT', 'the database file is corrupt; restore it from a backup'),
    ('SQLITE_NOTADB', 'the file is not an SQLite database; restore it from a backup'),
    ('SQLITE_CANTOPEN', 'the database file cannot be opened'),
    ('SQLITE_BUSY', 'another program kept the database locked past the busy timeout'),
)
CORRUPTION = ('SQLITE_CORRUPT', 'SQLITE_NOTADB')
# Python's sqlite3 raises this when stored text is not the UTF-8 that was written: a page
# overwritten. Its message goes on to quote the text, so only this start is ever read.
_UNDECODABLE_TEXT = 'Could not decode to UTF-8'


def describe_database_error(error):
    """What a database error means, in words for the log: SQLite's error name and its
    meaning (`SQLITE_FULL: the disk is full`), or a server driver's error type and code;
    never the error's message, which can quote data."""
    cause = _driver_error(error)
    if isinstance(cause, (StorageFault, WriterLockTimeout, WriterQueueError)):
        return str(cause)  # our own words
    name = sqlite_error_name(cause)
    if name:
        meaning = next((words for prefix, words in SQLITE_ERROR_MEANINGS
                        if name.startswith(prefix)), None)
        return f'{name}: {meaning}' if meaning else name
    if isinstance(cause, sqlite3.Error):
        return type(cause).__name__
    code = getattr(cause, 'pgcode', None) or next(
        (arg for arg in cause.args[:1] if isinstance(arg, int)), None)
    kind = f'{type(cause).__name__} {code}' if code else type(cause).__name__
    return f'{kind}: the database server is unreachable, or failed the request'


def sqlite_error_name(error):
    """SQLite's name for `error` (a peewee error or sqlite3's), e.g. SQLITE_IOERR_WRITE;
    None when it is not SQLite's."""
    cause = _driver_error(error)
    name = getattr(cause, 'sqlite_errorname', None)
    if name is None and isinstance(cause, sqlite3.OperationalError) and str(cause).startswith(
            _UNDECODABLE_TEXT):
        name = 'SQLITE_CORRUPT (text that is not UTF-8)'
    return name


def _driver_error(error):
    """The exception behind a peewee error: peewee raises its own, with the driver's (or
    ours, or its own again when nested) as `orig`. A rollback that failed with SQLite's
    generic SQLITE_ERROR ("no transaction is active": SQLite rolled back by itself, as on
    SQLITE_FULL) is explained by the error it was rolling back."""
    while True:
        while isinstance(getattr(error, 'orig', None), Exception):
            error = error.orig
        context = error.__context__
        if not (getattr(error, 'sqlite_errorname', None) == 'SQLITE_ERROR' and isinstance(
                context, (peewee.DatabaseError, sqlite3.DatabaseError))):
            return error
        error = context


def is_database_failure(error):
    """Whether `error` is the database failing (503), not the request or the code: a
    constraint refused, a query the code got wrong."""
    return isinstance(error, DATABASE_DOWN) or (sqlite_error_name(error) or '').startswith(
        CORRUPTION)


class StorageFault(peewee.OperationalError):
    """The SQLite file can no longer be served: it was replaced, removed or found corrupt.
    The message is words for the log, never data."""


# --- SQLite's file: the one the instance started on -----------------------------------------

def aside_name(path, reason, when=None):
    """The name a file is moved aside to and kept under: `<name>.<reason>-<UTC time>`, e.g.
    `persons.db-wal.replaced-20261204T150000Z`."""
    when = when or datetime.datetime.now(datetime.timezone.utc)
    return f'{path}.{reason}-{when.strftime("%Y%m%dT%H%M%SZ")}'


class _SqliteFile:
    """The database file an instance serves: which file it opened first (device and inode),
    and whether the instance must stop serving it, for good: it was replaced or removed
    under the service, or found corrupt. That much is shared by every process of the
    instance, through memory made before gunicorn forks its workers (connect() in the
    master makes it)."""

    REPLACED, CORRUPT = 1, 2  # bits of the shared fault byte

    def __init__(self, path):
        self.path = path
        self.opened = None  # (st_dev, st_ino) of the first file a connection opened
        self._fault = mmap.mmap(-1, 1)  # anonymous and shared: every worker forked sees it

    @property
    def fault(self):
        return self._fault[0]

    def identity(self):
        """(st_dev, st_ino) of the file at the path; None when there is none."""
        try:
            status = os.stat(self.path)
        except FileNotFoundError:
            return None
        except OSError:
            return self.opened  # cannot tell (an I/O error): SQLite will say more
        return status.st_dev, status.st_ino

    def check(self):
        """Raise StorageFault if the instance must no longer serve the file: found so by
        any process, or the path no longer names the file it opened (one stat)."""
        if self._fault[0]:
            _stop_serving(self)
        if self.opened is not None and self.identity() != self.opened:
            self.fail(self.REPLACED)

    def opening(self):
        """A connection has the file open and has read nothing yet: record the first file
        opened; refuse any other (it would be read with the old file's WAL)."""
        if self.opened is None:
            self.opened = self.identity()
        self.check()

    def fail(self, fault):
        self._fault[0] |= fault
        _stop_serving(self)

    def words(self):
        if self._fault[0] & self.REPLACED:
            return (f'the database file {self.path} was replaced or removed while the '
                    'service ran')
        return f'SQLITE_CORRUPT: the database file {self.path} is corrupt'


_sqlite_files = {}  # path -> _SqliteFile, kept across connect() in a process and its forks
_retired = []  # databases no longer served: their connections stay open (see _stop_serving)
_stopping = threading.Lock()


def _stop_serving(sqlite_file):
    """Stop serving `sqlite_file` in this process, once, and raise StorageFault.

    The models are bound to a twin database whose every connection refuses, so that every
    thread, reads included, answers 503 without a check on their way. The connections
    already open are kept open, never closed, for this process's life: closing the last
    one makes SQLite checkpoint and delete `<path>-wal` and `-shm` by name, the names of
    the new file's now (gunicorn.conf.py's worker_exit ends a worker without closing them).
    The -wal and -shm this process has open are moved aside, kept, so that the file now at
    the path is never opened with them.
    """
    with _stopping:
        serving = db.obj
        act = getattr(serving, 'file', None) is sqlite_file and not serving.retired
        if act:
            _retired.append(serving)
            db.initialize(serving.twin(retired=True))
    if act:
        if sqlite_file.fault & sqlite_file.REPLACED:
            moved = _move_aside_our_wal(sqlite_file.path)
            log.error('%s: this process no longer serves it (every request 503, /readyz '
                      '503)%s. Stop the service, put the database back with the restore '
                      'command of docs/backup.md, then start it', sqlite_file.words(),
                      f'; its WAL moved aside as {", ".join(moved)}' if moved else '')
        else:
            log.error('%s: this process no longer serves it (every request 503, /readyz '
                      '503). Stop the service, restore a backup with the restore command of '
                      'docs/backup.md, then start it', sqlite_file.words())
    raise StorageFault(sqlite_file.words())


def _move_aside_our_wal(path):
    """Rename `path`-wal and -shm aside if they are the ones this process has open (the
    replaced file's, not a new file's); returns the new names."""
    try:
        descriptors = os.listdir('/proc/self/fd')
    except OSError:
        return []  # cannot tell whose they are: leave them
    ours = set()
    for descriptor in descriptors:
        with contextlib.suppress(OSError):
            status = os.fstat(int(descriptor))
            ours.add((status.st_dev, status.st_ino))
    moved = []
    for name in (f'{path}-wal', f'{path}-shm'):
        with contextlib.suppress(FileNotFoundError):
            status = os.stat(name)
            if (status.st_dev, status.st_ino) in ours:
                moved.append(aside_name(name, 'replaced'))
                os.rename(name, moved[-1])
    return moved


class SqliteFileDatabase(peewee.SqliteDatabase):
    """SQLite in a file that stays the one the instance started on (see _SqliteFile)."""

    def __init__(self, database, retired=False, **options):
        super().__init__(database, **options)
        path = os.path.abspath(database)
        self.file = _sqlite_files.get(path) or _sqlite_files.setdefault(path, _SqliteFile(path))
        self.retired = retired
        self._options = options
        # Every connection open, so that a thread's end does not close its own: after a
        # replacement that too would delete the new file's WAL (see _stop_serving).
        self._kept = set()
        self._next_table_check = 0.0
        self._checking_tables = threading.Lock()

    def twin(self, **changes):
        return type(self)(self.database, **{'retired': self.retired, **self._options,
                                            **changes})

    def _connect(self):
        self.file.check()  # before SQLite opens the path: it would make an empty file there
        return super()._connect()

    def _add_conn_hooks(self, conn):
        self.file.opening()  # before the pragmas read the file, and its WAL
        super()._add_conn_hooks(conn)
        self._kept.add(conn)

    def _close(self, conn):
        """Close, unless the path names another file now: see _stop_serving."""
        with contextlib.suppress(StorageFault):
            self.file.check()
            self._kept.discard(conn)
            conn.close()

    def check_person_table(self):
        """Raise StorageFault if PRAGMA quick_check finds the person table corrupt; at
        most once a minute per process (on a million people it takes a fifth of a second)."""
        with self._checking_tables:
            if time.monotonic() < self._next_table_check:
                return
            self._next_table_check = time.monotonic() + TABLE_CHECK_EVERY
            try:
                problems = self.execute_sql('PRAGMA quick_check(person)').fetchall()
            except (peewee.DatabaseError, sqlite3.DatabaseError) as error:
                if not (sqlite_error_name(error) or '').startswith(CORRUPTION):
                    raise
                problems = [error]
        if problems != [('ok',)]:
            self.file.fail(self.file.CORRUPT)


class PooledSqliteFileDatabase(PooledDatabase, SqliteFileDatabase):
    """`sqlite+pool://`: peewee's pool over SqliteFileDatabase."""


TABLE_CHECK_EVERY = 60.0  # seconds


def confirm_no_person(person_id):
    """Before answering that no person has `person_id`. On SQLite, a corrupt page can read
    as no row: if the id is one the database gave out (at most the highest), the person
    table is checked (at most once a minute) and StorageFault raised if it is corrupt. A
    deleted person's id passes."""
    database = db.obj
    if not isinstance(database, SqliteFileDatabase):
        return
    database.file.check()
    highest = database.execute_sql(
        "SELECT seq FROM sqlite_sequence WHERE name = 'person'").fetchone()
    if highest and person_id <= highest[0]:
        database.check_person_table()


def database_file_replaced():
    """Whether the SQLite file this process serves was replaced or removed (one stat)."""
    sqlite_file = getattr(db.obj, 'file', None)
    if sqlite_file is None:
        return False
    with contextlib.suppress(StorageFault):
        sqlite_file.check()
    return bool(sqlite_file.fault & sqlite_file.REPLACED)


# --- Write health and readiness -------------------------------------------------------------

PROBE_EVERY = 1.0  # seconds: /readyz probes a write at most this often, per process
PROBE_WAIT = 1.0  # seconds /readyz's probe waits for the SQLite writers' queue


class _WriteHealth:
    """Whether writes work, as the last write or probe found, and each change logged once:
    `problem` is the cause in words, None while writes work. Per process, and afresh for
    each database bound (connect() makes it)."""

    def __init__(self):
        self.problem = None
        self.probed_at = -math.inf  # time.monotonic() of the last probe
        self._probing = threading.Lock()
        self._changing = threading.Lock()  # threads failing at once log the change once

    def worked(self):
        if self.problem is not None:  # read unlocked: a commit's hot path
            with self._changing:
                if self.problem is not None:
                    self.problem = None
                    log.info('database writes work again')

    def failed(self, words):
        """Writes fail for the cause `words` (`NAME: meaning`): logged when the meaning
        changes, not for another SQLite code of the same meaning (IOERR_WRITE, IOERR_FSYNC)."""
        with self._changing:
            if self.problem is None or _meaning(words) != _meaning(self.problem):
                log.error('database writes fail: %s; /readyz answers 503 until a write '
                          'works', words)
            self.problem = words

    def renew(self, probe):
        """Run `probe()`, a write, unless one ran less than PROBE_EVERY ago or runs now;
        returns whether it ran."""
        if time.monotonic() - self.probed_at < PROBE_EVERY or not self._probing.acquire(
                blocking=False):
            return False
        try:
            self.probed_at = time.monotonic()
            probe()
        finally:
            self._probing.release()
        return True


health = _WriteHealth()


def _meaning(words):
    return words.partition(': ')[2] or words


def note_database_failure(error):
    """Count a database failure met by a request, a write or the courier against write
    health. Returns a StorageFault to raise instead when it shows the SQLite file corrupt
    (it is then no longer served); None otherwise."""
    cause = _driver_error(error)
    if isinstance(cause, (StorageFault, WriterLockTimeout)):
        return None  # logged where it was raised; a stalled writer is no storage fault
    sqlite_file = getattr(db.obj, 'file', None)
    name = sqlite_error_name(cause) or ''
    words = describe_database_error(cause)
    if sqlite_file is not None and name.startswith(_FILESYSTEM_ERRORS):
        trouble = _filesystem_trouble(sqlite_file.path)
        if trouble:
            words = f'{name}: {trouble}'
        elif name.startswith(CORRUPTION):
            try:
                sqlite_file.fail(sqlite_file.CORRUPT)
            except StorageFault as fault:
                return fault
    health.failed(words)
    return None


# What SQLite reports of a filesystem gone read-only (writes refused as I/O errors; files
# not opened), or failing (files it cannot read reported as corrupt).
_FILESYSTEM_ERRORS = ('SQLITE_IOERR', 'SQLITE_READONLY', 'SQLITE_CANTOPEN', *CORRUPTION)


def _filesystem_trouble(path):
    """What fails in the file's filesystem, in words ('the filesystem is read-only', 'I/O
    error'): its first page read, an unnamed file made and dropped beside it. None when
    both work."""
    try:
        with open(path, 'rb') as file:
            file.read(4096)
        os.close(os.open(os.path.dirname(path), os.O_TMPFILE | os.O_WRONLY, 0o600))
    except OSError as error:
        return OS_ERROR_MEANINGS.get(error.errno)
    return None


def readiness_problem():
    """Why this instance should take no traffic now, in words; None when it may: write
    health, renewed by a probe at most once a second, so that every worker and replica
    finds a failing disk or server itself."""
    sqlite_file = getattr(db.obj, 'file', None)
    with contextlib.suppress(StorageFault):
        if sqlite_file is not None:
            sqlite_file.check()
        if not health.renew(_probe_writes):
            _query_answers()
    if sqlite_file is not None and sqlite_file.fault:
        return sqlite_file.words()
    return health.problem


def _query_answers():
    """Between probes, a query shows that the database still answers (a server stopped)."""
    try:
        db.execute_sql('SELECT 1')
    except DATABASE_DOWN as error:
        note_database_failure(error)


def _probe_writes():
    """A write that leaves nothing behind but proves writes commit: a schema_version row of
    version 0 added and deleted in one transaction still makes the database write and sync
    a page (an UPDATE to the same value would not: SQLite skips it). A probe kept waiting
    for the writers' queue proves nothing either way."""
    with contextlib.suppress(*DATABASE_DOWN):  # write_transaction has noted it
        with write_transaction(wait=PROBE_WAIT):
            SchemaVersion.insert(version=0, applied_at=0).execute()
            SchemaVersion.delete().where(SchemaVersion.version == 0).execute()


def email_key(email):
    """The address lower-cased and hashed: equal exactly when the addresses are equal but
    for case, on every engine (MySQL's default collation would also equate 'é' and 'e')."""
    return digest(email.lower())


def digest(text):
    """SHA-256 of `text` in hex: a key compared exactly, whatever the engine's collation."""
    return hashlib.sha256(text.encode()).hexdigest()


def connect(url):
    """Bind the models to the database at `url`; no connection is opened yet."""
    global health
    scheme = url.split(':', 1)[0].split('+', 1)[0]
    in_url = db_url.parse(url)
    in_file = False
    if scheme == 'sqlite':
        options = SQLITE_OPTIONS
        in_file = in_url['database'] not in ('', ':memory:')
        # At the start only: a worker forked later, with its folder failing, answers 503
        # (gunicorn would stop the whole service for a worker that fails to boot).
        if in_file and os.path.abspath(in_url['database']) not in _sqlite_files:
            _require_writable_folder(os.path.dirname(os.path.abspath(in_url['database'])))
        # The writers' queue waits as long as SQLite's busy handler would.
        _sqlite_writers.use_file(f"{in_url['database']}-lock" if in_file else None,
                                 in_url.get('timeout', options['timeout']))
    else:
        options = SERVER_OPTIONS.get(scheme.replace('postgresql', 'postgres'), {})
        # A server's connections are pooled, `+pool` or not (a pool per worker, filled after
        # the fork): opening one per request cost GET 7/8 of its speed on PostgreSQL.
        url = url.replace('://', '+pool://', 1) if '+' not in url.split('://', 1)[0] else url
    # Options spelled out in the URL's query string win over these defaults.
    options = {k: v for k, v in options.items() if k not in in_url}
    if in_file:  # a file that must stay the one the instance started on
        pooled = '+pool' in url.split('://', 1)[0]
        database = (PooledSqliteFileDatabase if pooled else SqliteFileDatabase)(**in_url, **options)
    else:
        database = db_url.connect(url, **options)
    db.initialize(database)
    health = _WriteHealth()
    _statements.clear()
    return database


class FolderNotWritable(RuntimeError):
    """The SQLite folder cannot be written: gunicorn prints the message alone and exits 1."""


def _require_writable_folder(folder):
    """Create the SQLite folder if missing; fail at start, in one line, if this user
    cannot write there (SQLite would fail at the first write, or at the WAL's files)."""
    try:
        os.makedirs(folder, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()  # the real test: access() can be fooled
    except OSError as error:
        if error.errno == errno.EROFS:  # no owner or mode can help there
            raise FolderNotWritable(
                f'the database folder {folder} is on a read-only filesystem: mount it '
                f'read-write, or point DATABASE_URL at a writable folder') from None
        raise FolderNotWritable(
            f'the database folder {folder} is not writable by UID {os.getuid()}: give that '
            f'user write access to it (for a volume: chown {os.getuid()} on it, or the '
            f'initContainer in deploy.yaml), or point DATABASE_URL at a writable folder') from None


def is_sqlite():
    return isinstance(db.obj, peewee.SqliteDatabase)


def _statement(key, query):
    """The SQL of `query()`, built on the first call for `key` since connect()."""
    sql = _statements.get(key)
    if sql is None:
        sql = _statements[key] = query().sql()[0]
    return sql


def find_email_and_version(person_id):
    """The person's (id, email, version), or None."""
    sql = _statement('find_email_and_version', lambda: Person.select(
        Person.id, Person.email, Person.version).where(Person.id == 0))
    return db.execute_sql(sql, (person_id,)).fetchone()


def persons_after(after, limit):
    """Up to `limit` persons whose ids are above `after`, in id order, as (id, first_name,
    last_name, email): a range of the primary key, as cheap at the millionth row as at
    the first (an OFFSET would read every row before it)."""
    sql = _statement('persons_after', lambda: Person.select(
        Person.id, Person.first_name, Person.last_name, Person.email).where(
        Person.id > 0).order_by(Person.id).limit(1))
    return db.execute_sql(sql, (after, limit)).fetchall()


def persons_with_email(email):
    """The person whose address is `email` but for case, as persons_after() gives rows: a
    list of one row or none, found through the unique index on email_key."""
    sql = _statement('persons_with_email', lambda: Person.select(
        Person.id, Person.first_name, Person.last_name, Person.email).where(
        Person.email_key == ''))
    return db.execute_sql(sql, (email_key(email),)).fetchall()


def service_key(name):
    """The random key called `name` (32 bytes, made by migrate()): the same for every
    process that uses this database, for as long as the database lasts."""
    return bytes.fromhex(ServiceKey.get(ServiceKey.name == name).value)


def _make_service_keys():
    """Make each of SERVICE_KEYS that the database does not hold yet."""
    for name in SERVICE_KEYS:
        ServiceKey.insert(name=name, value=secrets.token_hex(32)).on_conflict_ignore().execute()


def update_person(person_id, fields, versions=None):
    """Set `fields` of the person and count the change, if it is at one of `versions`
    (None: at any); returns the person as changed, or None when no row qualified.

    One conditional UPDATE: atomic on every engine, changing only the columns named, with
    no lock held between a read and the write.
    """
    query = _at_versions(Person.update(**fields, version=Person.version + 1), person_id,
                         versions)
    with write_transaction():
        if versions == [] or not query.execute():
            return None
        return Person.get_by_id(person_id)


def delete_person(person_id, versions=None):
    """Delete the person if it is at one of `versions` (None: at any), with every row that
    names them (their foreign keys cascade); True if it was."""
    query = _at_versions(Person.delete(), person_id, versions)
    with write_transaction():
        return versions != [] and bool(query.execute())


def _at_versions(query, person_id, versions):
    """`query` narrowed to the person `person_id` at one of `versions` (None: at any)."""
    query = query.where(Person.id == person_id)
    return query if versions is None else query.where(Person.version.in_(versions))


def person_exists(person_id):
    return Person.select(Person.id).where(Person.id == person_id).exists()


def insert(model, **values):
    """INSERT one row of `model` (defaults fill the columns not given); returns the id the
    database gave it, for a model whose id the database assigns."""
    row = {column: values[column.name] if column.name in values else _default(column)
           for column in _inserted_columns(model)}
    sql = _statement(model, lambda: model.insert(row))
    cursor = db.execute_sql(sql, [column.db_value(value) for column, value in row.items()])
    return cursor.fetchone()[0] if db.returning_clause else cursor.lastrowid


@functools.cache
def _inserted_columns(model):
    """Every column in peewee's order, but an id the database assigns."""
    return [field for field in model._meta.sorted_fields
            if not isinstance(field, peewee.AutoField)]


def _default(column):
    return column.default() if callable(column.default) else column.default


@contextlib.contextmanager
def write_transaction(wait=None):
    """A transaction for writes; on SQLite it begins IMMEDIATE (see SQLITE_OPTIONS) once
    the writers' queue gives it its turn (within `wait` seconds, by default the busy
    timeout), and commits only into the file the instance started on: a file replaced or
    removed under the service is found before the commit (one stat). What it meets counts
    for write health (see readiness_problem)."""
    database = db.obj
    try:
        if isinstance(database, peewee.SqliteDatabase):
            _sqlite_writers.take(wait)
            try:
                with database.atomic():
                    yield
                    if isinstance(database, SqliteFileDatabase):
                        database.file.check()
            finally:
                _sqlite_writers.release()
        else:
            with database.atomic():
                yield
    except peewee.PeeweeException as error:
        fault = note_database_failure(error) if is_database_failure(error) else None
        if fault is not None:
            raise fault from error
        raise
    health.worked()


def write_together(work):
    """Run `work()` in a write transaction and return what it returns, or raise what it
    raises; on SQLite, in one transaction with the other threads' writes of the moment.
    Never call it inside write_transaction(): the writer thread would wait for this one."""
    return _group_commit.write(work)


class _GroupCommit:
    """Group commit on SQLite: one writer thread per process runs the writes the request
    threads hand it, all that arrived while the last commit ran in one transaction, with
    one turn at the write lock and one fsync, rather than one each.

    A write whose own error (a duplicate address, say) fails its group is run again alone,
    so it fails alone; the database's errors fail the group. Database servers commit
    concurrent transactions well themselves: there each write runs in its own transaction,
    in the thread that asks.
    """

    MAX_GROUP = 32  # a longer transaction would keep other processes' writers waiting

    def __init__(self):
        self._writes = None  # this process's queue to its writer thread, made on first use
        self._starting = threading.Lock()
        os.register_at_fork(after_in_child=self._forget_writer)

    def _forget_writer(self):
        self._writes, self._starting = None, threading.Lock()  # no thread survives a fork

    def write(self, work):
        if not is_sqlite():
            with write_transaction():
                return work()
        write = _Write(work)
        (self._writes or self._start_writer()).put(write)
        return write.outcome()

    def _start_writer(self):
        with self._starting:
            if self._writes is None:
                writes = queue.SimpleQueue()
                threading.Thread(target=self._run, args=(writes,), name='sqlite-writer',
                                 daemon=True).start()
                self._writes = writes
        return self._writes

    def _run(self, writes):
        while True:
            group = [writes.get()]
            with contextlib.suppress(queue.Empty):
                while len(group) < self.MAX_GROUP:
                    group.append(writes.get_nowait())
            self._commit(group)

    def _commit(self, group):
        try:
            with write_transaction():
                results = [write.work() for write in group]
        except DATABASE_DOWN as error:
            for write in group:
                write.finish(error=error)
        except Exception as error:
            if len(group) == 1:
                group[0].finish(error=error)
            else:
                for write in group:  # find whose error it was
                    self._commit([write])
        else:
            for write, result in zip(group, results):
                write.finish(result)


class _Write:
    """A write handed to the writer thread, and its outcome once committed."""

    __slots__ = ('work', '_result', '_error', '_done')

    def __init__(self, work):
        self.work, self._result, self._error = work, None, None
        self._done = threading.Lock()  # the cheapest wait: held until the outcome is known
        self._done.acquire()

    def finish(self, result=None, error=None):
        self._result, self._error = result, error
        self._done.release()

    def outcome(self):
        self._done.acquire()
        if self._error is not None:
            raise self._error
        return self._result


_group_commit = _GroupCommit()


_erasure_unfinished = False  # a person was deleted and the WAL may still hold their bytes
_erasure_delayed = False  # the log says the erasure is unfinished; it says so once an episode


def erase_traces():
    """Call after a person's deletion commits. On SQLite, secure_delete has zeroed the rows'
    bytes in the pages, but the WAL still holds the pages as they were: checkpoint it into
    the database file and truncate it. If readers keep it busy, the courier's housekeeping
    tries again within a minute (finish_erasures)."""
    global _erasure_unfinished
    _erasure_unfinished = True
    finish_erasures()


def finish_erasures():
    global _erasure_unfinished, _erasure_delayed
    if not (_erasure_unfinished and is_sqlite()):
        _erasure_unfinished = False
        return
    _erasure_unfinished = not truncate_wal()
    if _erasure_unfinished and not _erasure_delayed:
        # With Litestream replicating, this lasts: docs/personal-data.md says what it means.
        log.warning('erasure unfinished: another connection is reading the database '
                    '(Litestream replicating, a backup), so the WAL, which still holds the '
                    'deleted rows, cannot be emptied yet; tried again every minute')
    elif _erasure_delayed and not _erasure_unfinished:
        log.info('erasure finished: the WAL is emptied')
    _erasure_delayed = _erasure_unfinished


# How long the erasure's checkpoint waits for readers to leave the WAL. It holds SQLite's
# write lock meanwhile: a long reader (Litestream's, which never ends; a backup's) would
# otherwise stall every write for the whole busy timeout, after each DELETE.
CHECKPOINT_WAIT_MS = 250


def truncate_wal():
    """On SQLite, copy the WAL into the database file and empty it; True when done."""
    if not is_sqlite():
        return True
    try:
        with _sqlite_writers:  # this process's writers queue here rather than in the busy handler
            (busy_timeout,) = db.execute_sql('PRAGMA busy_timeout').fetchone()
            db.execute_sql(f'PRAGMA busy_timeout = {min(busy_timeout, CHECKPOINT_WAIT_MS)}')
            try:
                busy, _, _ = db.execute_sql('PRAGMA wal_checkpoint(TRUNCATE)').fetchone()
            finally:
                db.execute_sql(f'PRAGMA busy_timeout = {busy_timeout}')
    except WriterLockTimeout:
        return False  # the queue was held past the busy timeout: tried again later
    return not busy


def skip_fsync_on_this_connection():
    """On SQLite, let this thread's commits skip the fsync: they still survive a crash of
    the process, and the next commit of a durable connection makes them durable too.

    For the courier's bookkeeping: a power cut can at worst forget that a mail was sent,
    which costs one duplicate, while an fsync per mail would halve how fast people can
    register (each fsync holds the single write lock).
    """
    if is_sqlite():
        db.execute_sql('PRAGMA synchronous = NORMAL')


def _version_2():
    """Persons get a version; SQLite's ids are never reused; POSTs remember their
    Idempotency-Key. Written to be run again after a partial run: MySQL commits each DDL."""
    if 'version' not in _columns('person'):
        if is_sqlite():
            _rebuild_sqlite_person_table()
        else:
            db.execute_sql('ALTER TABLE person ADD COLUMN version INTEGER NOT NULL DEFAULT 1')
    db.create_tables([IdempotencyKey], safe=True)


def _columns(table):
    return {column.name for column in db.get_columns(table)}


def _rebuild_sqlite_person_table():
    """SQLite cannot add AUTOINCREMENT to a table: make it anew and copy every row over
    (its ids included, which also starts the new table's counter after the highest), in
    the order SQLite's documentation gives, so that tables referring to it still do."""
    create = db.get_sql_context().sql(Person._schema._create_table(safe=False)).query()[0]
    db.execute_sql(create.replace('"person"', '"person_new"', 1))
    db.execute_sql('INSERT INTO person_new (id, first_name, last_name, email, email_key) '
                   'SELECT id, first_name, last_name, email, email_key FROM person')
    db.execute_sql('DROP TABLE person')
    db.execute_sql('ALTER TABLE person_new RENAME TO person')
    Person._schema.create_indexes()


def _version_3():
    """The outbox names its person instead of copying their address and names, and a sent
    mail's row is deleted: a waiting or failed mail moves to the person with its address,
    if there still is one; its give-up clock starts now. Run again after a partial run, it
    starts from the old table again."""
    if 'outbox_v2' not in db.get_tables():
        if 'person_id' in _columns('outbox'):
            return  # done, but the crash came before its version was recorded
        db.execute_sql('DROP INDEX outbox_status_due_at' +
                       (' ON outbox' if isinstance(db.obj, peewee.MySQLDatabase) else ''))
        db.execute_sql('ALTER TABLE outbox RENAME TO outbox_v2')
        if isinstance(db.obj, peewee.PostgresqlDatabase):  # names unique in the whole schema
            db.execute_sql('ALTER SEQUENCE outbox_id_seq RENAME TO outbox_v2_id_seq')
            db.execute_sql('ALTER INDEX outbox_pkey RENAME TO outbox_v2_pkey')
    db.create_tables([Outbox], safe=True)
    Outbox.delete().execute()
    now, param = time.time(), db.param
    db.execute_sql(
        'INSERT INTO outbox (person_id, status, created_at, due_at, attempts, claim, '
        'last_error, failed_at) '
        f"SELECT person.id, outbox_v2.status, {param}, outbox_v2.due_at, outbox_v2.attempts, '', "
        f"outbox_v2.last_error, CASE WHEN outbox_v2.status = 'failed' THEN {param} END "
        'FROM outbox_v2 JOIN person ON person.email = outbox_v2.recipient '
        "WHERE outbox_v2.status != 'sent'", (now, now))
    db.execute_sql('DROP TABLE outbox_v2')


def _version_4():
    """The service's own keys: the one that signs list cursors."""
    db.create_tables([ServiceKey], safe=True)
    _make_service_keys()


# MIGRATIONS[n - 2] brings a database of schema version n - 1 to version n. Version 1 is the
# schema made before versions were recorded; a new step goes at the end.
MIGRATIONS = [_version_2, _version_3, _version_4]
SCHEMA_VERSION = len(MIGRATIONS) + 1


def migrate():
    """Create the schema in an empty database, or bring an older one up to SCHEMA_VERSION,
    each step in a transaction with the record of its version. Serialised across processes,
    so replicas may start together."""
    with db.connection_context(), _schema_lock():
        version = schema_version()
        if version is None:
            with db.atomic():
                db.create_tables(MODELS)
                _make_service_keys()
                SchemaVersion.create(version=SCHEMA_VERSION)
            return
        for version in range(version + 1, SCHEMA_VERSION + 1):
            with db.atomic():
                SchemaVersion.create_table()  # version 1 had no record of its version
                MIGRATIONS[version - 2]()
                SchemaVersion.create(version=version)


def schema_version():
    """The database's schema version; None when it has no tables yet."""
    tables = db.get_tables()
    if SchemaVersion._meta.table_name in tables:
        return SchemaVersion.select(peewee.fn.MAX(SchemaVersion.version)).scalar()
    return 1 if Person._meta.table_name in tables else None


@contextlib.contextmanager
def _schema_lock():
    """Serialise migrations across processes: DDL is not atomic on every engine."""
    if isinstance(db.obj, peewee.PostgresqlDatabase):
        lock, unlock = 'SELECT pg_advisory_lock(7421001)', 'SELECT pg_advisory_unlock(7421001)'
    elif isinstance(db.obj, peewee.MySQLDatabase):
        lock, unlock = "SELECT GET_LOCK('personapi_schema', 60)", "SELECT RELEASE_LOCK('personapi_schema')"
    else:
        yield from _sqlite_schema_transaction()
        return
    db.execute_sql(lock)
    try:
        yield
    finally:
        db.execute_sql(unlock)


def _sqlite_schema_transaction():
    """BEGIN IMMEDIATE already admits one writer at a time. Foreign keys are off meanwhile,
    as SQLite asks for rebuilding a table (dropping the old one would cascade), and checked
    before the commit."""
    db.execute_sql('PRAGMA foreign_keys = OFF')  # a no-op inside a transaction: before BEGIN
    try:
        with db.atomic():
            yield
            if db.execute_sql('PRAGMA foreign_key_check').fetchone():
                raise peewee.IntegrityError('the migrated schema breaks a foreign key')
    finally:
        db.execute_sql('PRAGMA foreign_keys = ON')


def main(argv):
    if argv[1:] != ['migrate']:
        import backup  # check, backup and restore; it imports this module, not the reverse

        backup.main(argv)
        return
    from config import Config

    connect(Config.from_env_or_exit().database_url)
    migrate()
    print(f'schema version {SCHEMA_VERSION}')


if __name__ == '__main__':
    main(sys.argv)

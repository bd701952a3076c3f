"""Integrity checks, backups and restores of the SQLite database: the check gunicorn's master
runs before it forks, and `python models.py check | backup FILE | restore FILE`
(docs/backup.md). PostgreSQL and MariaDB check and back up their own storage; there these
commands say which of the server's tools to use instead of pretending.

Nothing here writes to the live database: it is only ever opened read-only, so that a
damaged file, or a file beside a WAL that is not its own, stays as it was found.
"""

import contextlib
import datetime
import errno
import fcntl
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from urllib.parse import quote

from playhouse import db_url

import models
from config import Config

USAGE = 'usage: python models.py migrate | check | backup [--force] FILE | restore FILE'
RESTORE_HINT = 'restore a backup with `models.py restore FILE` (docs/backup.md)'
# What each server engine offers in place of these commands (docs/backup.md).
SERVER_TOOLS = {
    'postgres': ('PostgreSQL', {
        'backup': 'pg_dump (and WAL archiving, for point-in-time recovery)',
        'restore': 'pg_restore (or a base backup and the archived WAL)',
        'check': 'data checksums and pg_amcheck'}),
    'mysql': ('MariaDB/MySQL', {
        'backup': 'mariadb-dump (and the binary log, for point-in-time recovery)',
        'restore': 'the mariadb client (and mariadb-binlog, for point-in-time recovery)',
        'check': 'mariadb-check'}),
}


class BackupError(RuntimeError):
    """A check, backup or restore that must stop; the message says why and what to do.
    A RuntimeError: gunicorn prints its message alone, in one line, and exits 1."""


class DatabaseCorrupt(BackupError):
    """The SQLite file fails its integrity check."""


# --- Checks -----------------------------------------------------------------------------------

def sqlite_path(url):
    """The file of a sqlite:// URL; None for a server's URL or a database in memory."""
    path = db_url.parse(url)['database'] if url.startswith('sqlite') else ''
    return os.path.abspath(path) if path not in ('', ':memory:') else None


def check_at_start(url):
    """Refuse to serve a corrupt SQLite file: run before anything opens it for writing.
    Returns how many seconds the check took (None: nothing to check)."""
    path = sqlite_path(url)
    if path is None or not os.path.exists(path):
        return None  # a server checks its own storage; a new file is made by migrate()
    return check(path, then=f'it is not served: {RESTORE_HINT}')


def check(path, then=RESTORE_HINT):
    """Run quick_check on the SQLite file at `path`, read-only; returns the seconds it took,
    or raises DatabaseCorrupt, whose message ends with `then`."""
    started = time.monotonic()
    try:
        with _owned_like(path), contextlib.closing(_open_read_only(path)) as connection:
            _require_intact(connection, 'quick_check', f'the database {path}', then)
    except sqlite3.Error as error:  # it could not be opened: unreadable, or locked
        raise BackupError(f'cannot check the database {path}: {_error_name(error)} '
                          f'({error})') from None
    return time.monotonic() - started


def _open_read_only(path):
    """A connection that can never write to `path`: it never checkpoints the WAL beside it
    into it (a WAL that belongs to another file would damage it for good)."""
    return sqlite3.connect(f'file:{quote(path)}?mode=ro', uri=True,
                           timeout=models.SQLITE_OPTIONS['timeout'])


def _require_intact(connection, pragma, what, then):
    """Raise DatabaseCorrupt, saying `what` is corrupt and `then`, unless `pragma` finds
    nothing wrong."""
    try:
        problems = [row[0] for row in connection.execute(f'PRAGMA {pragma}')]
    except sqlite3.DatabaseError as error:
        if not _error_name(error).startswith(('SQLITE_CORRUPT', 'SQLITE_NOTADB')):
            raise
        problems = [_error_name(error)]
    if problems != ['ok']:
        first = f'{len(problems)} problems, the first: ' if len(problems) > 1 else ''
        problem = ' '.join(problems[0].split())[:200]  # SQLite's own may span lines
        raise DatabaseCorrupt(f'{what} is corrupt ({pragma}: {first}{problem}); {then}')


def _error_name(error):
    return models.sqlite_error_name(error) or type(error).__name__


@contextlib.contextmanager
def _owned_like(path):
    """Give the -wal and -shm files that SQLite makes beside `path` while a block runs the
    owner of `path`: run as root, it would leave them to root, and the service could no
    longer open its own database."""
    made = [name for name in (f'{path}-wal', f'{path}-shm') if not os.path.exists(name)]
    try:
        yield
    finally:
        if os.geteuid() == 0 and os.path.exists(path):
            owner = os.stat(path)
            for name in made:
                with contextlib.suppress(FileNotFoundError):
                    os.chown(name, owner.st_uid, owner.st_gid)


# --- Backup -----------------------------------------------------------------------------------

def backup(path, target, *, force=False):
    """Write a consistent snapshot of the SQLite file at `path` to `target`, while the
    service goes on writing; returns (people, seconds).

    SQLite's backup API in one step: one read transaction for the whole copy, so the
    snapshot is the database as it was when the backup began, and in WAL mode the
    writers go on meanwhile (a backup in several steps starts again whenever a write
    comes between two steps, and under steady writes may never end). The copy is checked
    (integrity_check) and appears at `target` whole or not at all.
    """
    target = os.path.abspath(target)
    if _is_live_file(path, target):
        raise BackupError(f'{target} is the live database or one of its files: back up '
                          'to another name')
    if os.path.lexists(target) and not force:
        raise BackupError(f'{target} exists: choose another name, or pass --force to '
                          'replace it')
    if not os.path.exists(path):
        raise BackupError(f'there is no database at {path} to back up')
    started = time.monotonic()
    with _temporary_beside(target) as temporary:
        with contextlib.closing(sqlite3.connect(temporary, isolation_level=None)) as copy:
            # The copy is thrown away on any failure and synced once it is whole.
            copy.execute('PRAGMA journal_mode = OFF')
            copy.execute('PRAGMA synchronous = OFF')
            with _owned_like(path), contextlib.closing(_open_read_only(path)) as source:
                source.backup(copy)
            people = _describe(copy, f'the copy of {path}', 'no backup was written: '
                               f'{RESTORE_HINT}')[1]
        _publish(temporary, target, replace=force)
    return people, time.monotonic() - started


def _is_live_file(path, other):
    return other in (path, f'{path}-wal', f'{path}-shm', f'{path}-journal', f'{path}-lock')


def _describe(connection, what, then):
    """Make the snapshot `connection` opened a file of its own (no WAL beside it) and check
    it (see _require_intact); returns (schema version, people)."""
    connection.execute('PRAGMA journal_mode = DELETE')
    _require_intact(connection, 'integrity_check', what, then)
    tables = {name for (name,) in connection.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table'")}
    if models.SchemaVersion._meta.table_name in tables:
        (version,), = connection.execute('SELECT MAX(version) FROM schema_version')
    elif models.Person._meta.table_name in tables:
        version = 1  # the schema before versions were recorded
    else:
        raise BackupError(f'{what} holds no personapi database (no person table)')
    (people,), = connection.execute('SELECT COUNT(*) FROM person')
    return version, people


@contextlib.contextmanager
def _temporary_beside(target):
    """A new file's name in `target`'s folder (so a rename can put it in place), removed
    unless it was put in place."""
    folder = os.path.dirname(target)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=f'.{os.path.basename(target)}.',
                                         suffix='.tmp')
    os.close(handle)
    try:
        yield temporary
    finally:
        for name in (temporary, f'{temporary}-journal', f'{temporary}-wal', f'{temporary}-shm'):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)


def _publish(temporary, target, *, replace):
    """Put the whole, synced file `temporary` at `target` in one step, and make the new
    name survive a power cut; without `replace`, never over an existing file."""
    _fsync(temporary)
    if replace:
        os.replace(temporary, target)
    else:
        try:
            os.link(temporary, target)  # unlike rename, fails if `target` appeared meanwhile
        except FileExistsError:
            raise BackupError(f'{target} exists: choose another name, or pass --force to '
                              'replace it') from None
        os.unlink(temporary)
    _fsync(os.path.dirname(target))


def _fsync(path):
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


# --- Restore ----------------------------------------------------------------------------------

def restore(path, snapshot):
    """Put the snapshot at `path`, with the service stopped: check it, move the current
    database and its -wal and -shm (and Litestream's local state) aside, and put a copy of
    the snapshot in their place. Returns (schema version, people, names moved aside)."""
    snapshot = os.path.abspath(snapshot)
    if not os.path.isfile(snapshot):
        raise BackupError(f'there is no file {snapshot} to restore')
    if _is_live_file(path, snapshot):
        raise BackupError(f'{snapshot} is the live database itself: restore a backup of it')
    if os.path.exists(f'{snapshot}-wal') and os.path.getsize(f'{snapshot}-wal'):
        raise BackupError(f'{snapshot} has a -wal beside it: it is a copy of a live database, '
                          'not a snapshot; take one with `models.py backup FILE`')
    os.makedirs(os.path.dirname(path), exist_ok=True)  # an empty volume's first restore
    with _temporary_beside(path) as temporary:
        shutil.copyfile(snapshot, temporary)
        with contextlib.closing(sqlite3.connect(temporary, isolation_level=None)) as copy:
            version, people = _describe(copy, snapshot, 'nothing was restored')
        if version > models.SCHEMA_VERSION:
            raise BackupError(f'{snapshot} has schema version {version}, newer than this '
                              f'code runs ({models.SCHEMA_VERSION}): restore it with the '
                              'release that made it')
        _take_ownership_of(temporary, path)
        with _nobody_using(path):
            moved = _move_aside(path, 'replaced')
            _publish(temporary, path, replace=True)
    return version, people, moved


def _take_ownership_of(temporary, path):
    """The restored file is the service's: it gets the owner of the file it replaces (of
    the folder, when there is none), also when root restores it; only they may read it."""
    os.chmod(temporary, 0o600)
    if os.geteuid() == 0:
        like = os.stat(path if os.path.exists(path) else os.path.dirname(path))
        os.chown(temporary, like.st_uid, like.st_gid)


@contextlib.contextmanager
def _nobody_using(path):
    """Refuse while any process has the database open, and keep others out while the
    block runs. Every SQLite connection holds a read lock on the database file (in WAL
    mode, for as long as it is open) and on its -shm: gunicorn's workers, Litestream, a
    backup, a sqlite3 shell. A write lock on both, taken without waiting, is refused if
    any such lock is held, and held it keeps a starting service waiting."""
    with contextlib.ExitStack() as locks:
        for name in (path, f'{path}-shm'):
            try:
                handle = os.open(name, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            locks.callback(os.close, handle)
            try:
                fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                if error.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise BackupError(f'{path} is open in another process (the service, '
                                  'Litestream, a backup): stop it, then restore') from None
        yield


def _move_aside(path, reason):
    """Rename the database's files to `<name>.<reason>-<UTC time>`, the WAL and shared
    memory before the database: a crash in between must never leave a database file
    beside a WAL that is not its own. Returns the new names."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime('%Y%m%dT%H%M%SZ')
    folder, name = os.path.split(path)
    present = [old for old in (f'{path}-wal', f'{path}-shm', path,
                               os.path.join(folder, f'.{name}-litestream'))
               if os.path.lexists(old)]
    if any(os.path.lexists(f'{old}.{reason}-{stamp}') for old in present):
        raise BackupError(f'files named {reason}-{stamp} exist already: try again in a second')
    for old in present:
        os.rename(old, f'{old}.{reason}-{stamp}')
    return [f'{old}.{reason}-{stamp}' for old in present]


# --- Command line -----------------------------------------------------------------------------

def main(argv):
    """`python models.py check | backup [--force] FILE | restore FILE`: one line out, exit
    code 0 when done, 1 when refused."""
    command, *arguments = argv[1:] or ['']
    force = '--force' in arguments and command == 'backup'
    if force:
        arguments.remove('--force')
    if (command, len(arguments)) not in (('check', 0), ('backup', 1), ('restore', 1)):
        sys.exit(USAGE)
    url = Config.from_env_or_exit().database_url
    try:
        print(_run(command, url, *arguments, force=force))
    except BackupError as error:
        sys.exit(f'personapi: {error}')
    except sqlite3.Error as error:
        sys.exit(f'personapi: {command} failed: {_error_name(error)} ({error})')
    except OSError as error:
        sys.exit(f'personapi: {command} failed: {error}')


def _run(command, url, *arguments, force):
    path = sqlite_path(url)
    if path is None and url.startswith('sqlite'):
        raise BackupError('the database is in memory: there is nothing to check or copy')
    if path is None:
        return _on_server(command, url)
    if command == 'check':
        if not os.path.exists(path):
            raise BackupError(f'there is no database at {path}')
        return f'{path}: ok (quick_check, {check(path):.2f} s)'
    if command == 'backup':
        people, seconds = backup(path, arguments[0], force=force)
        return (f'backed up {path} to {os.path.abspath(arguments[0])}: {people} people, '
                f'integrity_check ok, {seconds:.2f} s')
    version, people, moved = restore(path, arguments[0])
    kept = f'; the former files are kept as {", ".join(moved)}' if moved else ''
    return (f'restored {path} from {os.path.abspath(arguments[0])}: {people} people, schema '
            f'version {version}, integrity_check ok{kept}. Start the service.')


def _on_server(command, url):
    """PostgreSQL and MariaDB keep and check their own storage: `check` reads the schema
    version; `backup` and `restore` say which of the server's tools to use."""
    engine = url.split(':', 1)[0].split('+', 1)[0].replace('postgresql', 'postgres')
    name, tools = SERVER_TOOLS[engine]
    if command != 'check':
        raise BackupError(f'on {name} the server keeps the data: use {tools[command]} '
                          f'(docs/backup.md); `models.py {command}` copies SQLite '
                          'files only')
    models.connect(url)
    with models.db.connection_context():
        version = models.schema_version()
    return (f'{name} answers, schema version {version}; its storage is checked by the '
            f'server itself ({tools["check"]})')

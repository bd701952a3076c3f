"""What the bench's scripts share: where they work, the seeded SQLite database, the pages
they ask for, and the gunicorn processes they start (a free loopback port, readiness, the
workers of a master).

bench/run.py (the load runs) and bench/instructions.py (the counts) both import it, and
neither imports the other.
"""

import contextlib
import http.client
import shutil
import sqlite3
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the service's modules and this package, from any folder
BENCH = ROOT / 'bench'
WORK = BENCH / 'work'
SEED_PERSONS = 10_000
PAGE = 20  # persons per page of GET /person, the service's default


def seed(path, persons):
    """A database with the service's schema and `persons` rows, in one bulk transaction."""
    path.unlink(missing_ok=True)
    import models

    models.connect(f'sqlite:///{path}')
    models.migrate()
    models.db.close()
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute('PRAGMA synchronous=OFF')  # a seed needs no durability
    connection.execute('BEGIN')
    connection.executemany(
        'INSERT INTO person (id, first_name, last_name, email, email_key) VALUES (?, ?, ?, ?, ?)',
        seed_rows(persons))
    connection.execute('COMMIT')
    connection.execute('PRAGMA wal_checkpoint(TRUNCATE)')  # the template is one file to copy
    connection.close()


def seed_rows(persons):
    """The seeded persons' (id, first_name, last_name, email, email_key)."""
    return ((i, f'First{i}', f'Last{i}', f'person{i}@example.org', f'person{i}@example.org')
            for i in range(1, persons + 1))


def page_paths(after, signed, database):
    """GET /person's paths for the pages after each id of `after` (None: the first page).
    A signed cursor is the service's own, made with the key in `database` (SQLite); the
    ceilings take the bare id."""
    make = str
    if signed:
        import models
        import personapi

        models.connect(f'sqlite:///{database}')
        with models.db.connection_context():
            make = personapi.Cursors(models.service_key(models.CURSOR_KEY)).make
    return ['/person' if last is None else f'/person?cursor={make(last)}' for last in after]


def free_port():
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


def workers_of(master_pid):
    pids = []
    for stat in Path('/proc').glob('[0-9]*/stat'):
        with contextlib.suppress(OSError):
            # The parent pid is the second field after the parenthesised command name.
            if int(stat.read_text().rsplit(')', 1)[1].split()[1]) == master_pid:
                pids.append(int(stat.parent.name))
    return pids


def wait_ready(process, port, log, seconds=30):
    """Until gunicorn on `port` answers GET /person/1 (a 404 on an empty database)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f'gunicorn exited; see {log}')
        with contextlib.suppress(OSError):
            connection = http.client.HTTPConnection('127.0.0.1', port, timeout=2)
            connection.request('GET', '/person/1')
            if connection.getresponse().status in (200, 404):
                return
        time.sleep(0.1)
    raise RuntimeError(f'gunicorn not ready after {seconds} s; see {log}')


def have(program):
    return shutil.which(program) is not None

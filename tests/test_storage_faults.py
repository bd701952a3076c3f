"""Storage faults, real ones: the SQLite file replaced, removed or corrupted under the
service, a disk filled up, a filesystem gone read-only or failing. SQLite's by nature:
pinned to it, but for the readiness probe, which every engine runs. (A writer stopped while
it holds the writers' queue: test_safe_writes.py; a killed master: test_service.py.)"""

import contextlib
import fcntl
import glob
import logging
import os
import random
import shutil
import sqlite3
import struct
import subprocess
import threading
import time

import peewee
import pytest
import webtest

import models
import personapi
from models import Person, SchemaVersion
from support import Service, error_lines, free_port, one_engine, wait_until
from test_service import person


def sqlite_path(url):
    return url.removeprefix('sqlite:///').split('?')[0]


def snapshot(path, copy):
    """A consistent copy of the live database, as a backup would be."""
    with contextlib.closing(sqlite3.connect(path)) as live, \
            contextlib.closing(sqlite3.connect(copy)) as target:
        live.backup(target)


def inspect(path):
    """(integrity_check's verdict, people) of the file at `path`, read as a restart would."""
    with contextlib.closing(sqlite3.connect(path)) as database:
        return (database.execute('PRAGMA integrity_check').fetchone()[0],
                database.execute('SELECT count(*) FROM person').fetchone()[0])


def database_errors(caplog):
    """The ERROR lines the app logged about its database."""
    return [record.getMessage() for record in caplog.records
            if record.name == 'personapi.models' and record.levelno >= logging.ERROR]


def statuses(service, method, path, count, body=None):
    return [service.request(method, path, body)[0] for _ in range(count)]


def seconds_until(predicate, timeout):
    """Seconds until `predicate()` holds (polled), or fail past `timeout`."""
    started = time.monotonic()
    assert wait_until(predicate, timeout, interval=0.1)
    return round(time.monotonic() - started, 1)


def all_ready(service, status, probes=6):
    """Whether /readyz answers `status` to each of `probes` connections (which the kernel
    shares out between the workers)."""
    return statuses(service, 'GET', '/readyz', probes) == [status] * probes


# --- What the log calls an error ------------------------------------------------------------

def make_sqlite_error(tmp_path, kind):
    """A real sqlite3 error of `kind`."""
    path = str(tmp_path / 'words.db')
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as database:
        database.execute('CREATE TABLE t (x)')
        if kind == 'FULL':
            database.execute('PRAGMA max_page_count = 2')
            return _error_of(lambda: database.execute("INSERT INTO t VALUES (zeroblob(9000))"))
        if kind == 'BUSY':
            with contextlib.closing(sqlite3.connect(path, timeout=0, isolation_level=None)) as other:
                database.execute('BEGIN IMMEDIATE')
                return _error_of(lambda: other.execute('BEGIN IMMEDIATE'))
    if kind == 'READONLY':
        with contextlib.closing(sqlite3.connect(f'file:{path}?mode=ro', uri=True)) as database:
            return _error_of(lambda: database.execute('INSERT INTO t VALUES (1)'))
    if kind == 'NOTADB':
        (tmp_path / 'text.db').write_text('secret@example.com ' * 500)
        with contextlib.closing(sqlite3.connect(str(tmp_path / 'text.db'))) as database:
            return _error_of(lambda: database.execute('SELECT * FROM t'))
    if kind == 'CANTOPEN':
        return _error_of(lambda: sqlite3.connect(str(tmp_path / 'missing' / 'x.db')))
    raise ValueError(kind)


def _error_of(action):
    try:
        action()
    except sqlite3.Error as error:
        return error
    raise AssertionError('no error')


@pytest.mark.parametrize('kind, words', [
    ('FULL', 'SQLITE_FULL: the disk is full'),
    ('READONLY', 'SQLITE_READONLY: the filesystem or file is read-only'),
    ('BUSY', 'SQLITE_BUSY: another program kept the database locked past the busy timeout'),
    ('NOTADB', 'SQLITE_NOTADB: the file is not an SQLite database; restore it from a backup'),
    ('CANTOPEN', 'SQLITE_CANTOPEN: the database file cannot be opened')])
def test_sqlite_errors_are_named_in_words_never_with_their_message(tmp_path, kind, words):
    error = make_sqlite_error(tmp_path, kind)
    wrapped = peewee.OperationalError(error, *error.args)  # as peewee raises it
    assert models.describe_database_error(error) == words
    assert models.describe_database_error(peewee.OperationalError(wrapped)) == words


def test_a_server_error_is_named_by_its_type_never_its_message():
    import psycopg2

    with pytest.raises(psycopg2.OperationalError) as refused:
        psycopg2.connect(host='127.0.0.1', port=free_port(), connect_timeout=5)
    words = models.describe_database_error(peewee.OperationalError(refused.value))
    assert words == 'OperationalError: the database server is unreachable, or failed the request'


# --- The file replaced, removed or renamed under the service --------------------------------

CHANGES = {
    'replaced': lambda path, copy: os.replace(copy, path),  # `mv copy persons.db`
    'removed': lambda path, copy: os.remove(path),
    'renamed': lambda path, copy: os.rename(path, f'{path}.old'),
}


@one_engine
@pytest.mark.parametrize('change', CHANGES)
def test_a_file_changed_under_the_app_takes_no_write_and_serves_nothing(
        client, database_url, tmp_path, caplog, change):
    path = sqlite_path(database_url)
    ids = [client.post_json('/person', person(n), status=201).json['id'] for n in range(2)]
    snapshot(path, tmp_path / 'copy.db')
    ids.append(client.post_json('/person', person(2), status=201).json['id'])
    with caplog.at_level(logging.ERROR, logger='personapi.models'):
        CHANGES[change](path, tmp_path / 'copy.db')
        assert client.post_json('/person', person(3), status='*').status_int == 503
        assert [client.get(f'/person/{i}', status='*').status_int for i in ids] == [503] * 3
        assert client.patch_json(f'/person/{ids[0]}', {'last_name': 'X'}, status='*').status_int == 503
        assert client.get('/readyz', status='*').status_int == 503
    (line,) = database_errors(caplog)
    assert f'{path} was replaced or removed' in line and 'docs/backup.md' in line
    moved = sorted(glob.glob(f'{path}-wal.replaced-*') + glob.glob(f'{path}-shm.replaced-*'))
    assert [name.rpartition('.')[0] for name in moved] == [f'{path}-shm', f'{path}-wal']
    assert all(name in line for name in moved)
    if change == 'replaced':  # the new file, never opened with the old one's WAL
        assert inspect(path) == ('ok', 2)
    elif change == 'removed':  # SQLite would have made an empty file at the path
        assert not os.path.exists(path)
    else:  # the renamed file and its WAL, put back together, hold every 201
        os.rename(f'{path}.old', path)
        os.rename(next(name for name in moved if '-wal.' in name), f'{path}-wal')
        assert inspect(path) == ('ok', 3)


@one_engine
def test_a_new_thread_never_opens_the_new_file(client, database_url, tmp_path):
    """A connection opened after the change (a new thread, a reconnect) is refused."""
    path = sqlite_path(database_url)
    client.post_json('/person', person(1), status=201)
    snapshot(path, tmp_path / 'copy.db')
    os.replace(tmp_path / 'copy.db', path)
    outcome = []
    thread = threading.Thread(target=lambda: outcome.append(
        client.get('/person/1', status='*').status_int))
    thread.start()
    thread.join(10)
    assert outcome == [503]
    assert glob.glob(f'{path}-wal.replaced-*')  # its WAL, still open here, moved aside


@one_engine
@pytest.mark.parametrize('change, stop', [
    ('replaced', 'kill -9'), ('replaced', 'SIGTERM'), ('removed', 'kill -9')])
def test_a_file_changed_under_gunicorn_takes_no_write_and_a_restart_finds_it_whole(
        service_env, tmp_path, change, stop):
    path = sqlite_path(service_env['DATABASE_URL'])
    log_path = tmp_path / 'gunicorn.log'
    service = Service(service_env, log_path=log_path).start()
    try:
        ids = [service.request('POST', '/person', person(n))[2]['id'] for n in range(5)]
        snapshot(path, tmp_path / 'copy.db')
        assert statuses(service, 'POST', '/person', 1, person(5)) == [201]  # the copy lacks it
        CHANGES[change](path, tmp_path / 'copy.db')
        after = [service.request('POST', '/person', person(n))[0] for n in range(6, 16)]
        assert after == [503] * 10  # no 201 a restart would forget
        assert all_ready(service, 503, probes=10)
        assert statuses(service, 'GET', f'/person/{ids[0]}', 4) == [503] * 4
        assert os.path.exists(path) == (change == 'replaced')  # no empty file made there
    finally:
        service.kill() if stop == 'kill -9' else service.stop()
    lines = error_lines(log_path, 'was replaced or removed while the service ran')
    assert lines and set(lines.values()) == {1}  # one line per process that found it
    kept = 5 if change == 'replaced' else 0  # a removed file's people are gone with it
    restarted = Service(service_env, log_path=log_path).start()
    try:
        assert [restarted.request('GET', f'/person/{i}')[0] for i in ids] == (
            [200 if kept else 404] * 5)
        assert restarted.request('POST', '/person', person(20))[0] == 201
    finally:
        restarted.kill()
    assert inspect(path) == ('ok', kept + 1)


@one_engine
def test_an_old_instance_ending_never_deletes_the_new_files_wal(service_env, tmp_path):
    """SQLite deletes `<path>-wal` by name when the last connection to a database closes:
    an instance that served the replaced file must not, once another serves the new one."""
    path = sqlite_path(service_env['DATABASE_URL'])
    old = Service(service_env, log_path=tmp_path / 'old.log').start()
    try:
        assert old.request('POST', '/person', person(1))[0] == 201
        snapshot(path, tmp_path / 'copy.db')
        os.replace(tmp_path / 'copy.db', path)
        assert all_ready(old, 503, probes=10)  # each worker finds it
        new = Service(service_env, log_path=tmp_path / 'new.log').start()
        try:
            assert [new.request('POST', '/person', person(n))[0] for n in range(2, 5)] == [201] * 3
            wal = os.stat(f'{path}-wal').st_ino
            old.stop()  # the old workers end, and their connections with them
            assert os.stat(f'{path}-wal').st_ino == wal
        finally:
            new.kill()  # nothing checkpointed: the new people are in the WAL alone
    finally:
        old.kill()
    assert inspect(path) == ('ok', 4)


# --- A corrupt page met at run time ---------------------------------------------------------

def corrupt_a_leaf(path, name, whole):
    """Overwrite a leaf page of the b-tree `name` with garbage: the whole page, or its cells
    alone (its header kept: then SQLite may read the rows it held as absent)."""
    with contextlib.closing(sqlite3.connect(path)) as database:
        pages = [page for (page,) in database.execute(
            "SELECT pageno FROM dbstat WHERE name = ? AND pagetype = 'leaf'", (name,))]
        page_size = database.execute('PRAGMA page_size').fetchone()[0]
    start = 0 if whole else page_size // 2
    with open(path, 'r+b') as file:
        file.seek((pages[len(pages) // 2] - 1) * page_size + start)
        file.write(random.Random(22).randbytes(page_size - start))


@pytest.fixture
def thousand_people(database_url):
    """1,000 people, all in the database file itself (the WAL checkpointed), and no
    connection left open that could have the pages cached."""
    with models.write_transaction():
        for n in range(1000):
            models.insert(Person, **person(n), email_key=models.email_key(person(n)['email']))
    assert models.truncate_wal()
    models.db.close()
    return sqlite_path(database_url)


def read_everyone(client):
    return [client.get(f'/person/{n}', status='*').status_int for n in range(1, 1001)]


def register_others(client):
    return [client.post_json('/person', {**person(n), 'email': f'new{n}@example.com'},
                             status='*').status_int for n in range(100)]


@one_engine
@pytest.mark.parametrize('whole', [True, False], ids=['whole page', 'cells'])
@pytest.mark.parametrize('b_tree, requests, served', [
    ('person', read_everyone, 200), ('person_email_key', register_others, 201)],
    ids=['person table', 'email index'])
def test_a_corrupt_page_answers_503_never_404_or_500(client, thousand_people, caplog, b_tree,
                                                     requests, served, whole):
    corrupt_a_leaf(thousand_people, b_tree, whole)
    with caplog.at_level(logging.ERROR, logger='personapi.models'):
        answers = requests(client)
        later = [client.get('/person/1', status='*').status_int,
                 client.patch_json('/person/1', {'last_name': 'X'}, status='*').status_int,
                 client.get('/readyz', status='*').status_int]
    assert set(answers) <= {served, 503} and 503 in answers
    assert set(answers[answers.index(503):]) == {503}  # once found, nothing is served
    assert later == [503] * 3
    (line,) = database_errors(caplog)
    assert line.startswith('SQLITE_CORRUPT: the database file') and 'restore' in line


# --- Write health and readiness -------------------------------------------------------------

def test_readiness_probes_a_write_that_leaves_nothing_behind(client):
    before = list(SchemaVersion.select().tuples())
    assert client.get('/readyz').json == {'status': 'ready'}
    assert models.health.problem is None and models.health.probed_at > time.monotonic() - 5
    assert list(SchemaVersion.select().tuples()) == before


@one_engine
def test_a_failing_database_is_logged_once_not_per_request(config, courier, caplog):
    models.connect(f'postgresql://postgres@127.0.0.1:{free_port()}/gone')  # nobody listens
    app = webtest.TestApp(personapi.create_app(config, courier))
    with caplog.at_level(logging.INFO):
        for path in ['/person/1', '/readyz', '/person/2', '/readyz']:
            assert app.get(path, status='*').status_int == 503
    assert [record.getMessage() for record in caplog.records if record.name.startswith(
        'personapi') and record.levelno >= logging.WARNING] == [
        'database writes fail: OperationalError: the database server is unreachable, or '
        'failed the request; /readyz answers 503 until a write works']


# --- Real filesystems: full, read-only, failing ---------------------------------------------

def run(*command):
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def require_root():
    if os.geteuid() != 0:
        pytest.skip('mounting filesystems needs root')


@contextlib.contextmanager
def mounted(folder, *mount_arguments, device=None):
    """Mount, then unmount however the test ends (lazily if a process still has files
    open there); skip when mounting is impossible here."""
    folder.mkdir()
    result = run('mount', *mount_arguments, str(folder))
    if result.returncode:
        pytest.skip(f'cannot mount here: {result.stderr.strip()}')
    try:
        yield folder
    finally:
        if run('umount', str(folder)).returncode:
            run('umount', '-l', str(folder))


@contextlib.contextmanager
def ext4_loop(tmp_path):
    """A 32 MB ext4 filesystem on a loop device, mounted as distributions do: errors make
    it read-only. Yields (folder, device)."""
    for tool in ('mkfs.ext4', 'losetup'):
        if not shutil.which(tool):
            pytest.skip(f'{tool} is not installed')
    image = tmp_path / 'ext4.img'
    with open(image, 'wb') as file:
        file.truncate(32 * 2 ** 20)
    assert run('mkfs.ext4', '-q', '-F', str(image)).returncode == 0
    attached = run('losetup', '--find', '--show', str(image))
    if attached.returncode:
        pytest.skip(f'no loop device: {attached.stderr.strip()}')
    device = attached.stdout.strip()
    try:
        with mounted(tmp_path / 'ext4', '-o', 'errors=remount-ro', device) as folder:
            yield folder, device
    finally:
        run('losetup', '-d', device)


def service_on(folder, service_env, log_path):
    return Service({**service_env, 'DATABASE_URL': f'sqlite:///{folder}/persons.db'},
                   log_path=log_path).start()


def fill(folder):
    """Write a file until the filesystem is full."""
    with open(folder / 'filler', 'wb') as filler:
        with contextlib.suppress(OSError):
            while True:
                filler.write(b'\0' * 65536)
                filler.flush()


@one_engine
def test_a_full_disk_makes_the_service_unready_until_space_is_freed(service_env, tmp_path):
    require_root()
    log_path = tmp_path / 'gunicorn.log'
    with mounted(tmp_path / 'disk', '-t', 'tmpfs', '-o', 'size=8m', 'tmpfs') as folder:
        service = service_on(folder, service_env, log_path)
        try:
            assert statuses(service, 'POST', '/person', 1, person(1)) == [201]
            fill(folder)
            unready = seconds_until(lambda: all_ready(service, 503), timeout=10)
            assert statuses(service, 'POST', '/person', 3, person(2)) == [503] * 3
            assert statuses(service, 'GET', '/person/1', 1) == [200]  # reads still work
            os.remove(folder / 'filler')
            ready = seconds_until(lambda: all_ready(service, 200), timeout=10)
            print(f'/readyz 503 {unready} s after the disk filled, 200 {ready} s after space '
                  'came back')
            assert statuses(service, 'POST', '/person', 1, person(2)) == [201]
        finally:
            service.kill()
    lines = error_lines(log_path, 'database writes fail: SQLITE_FULL: the disk is full')
    assert lines and set(lines.values()) == {1}
    assert 'database writes work again' in log_path.read_text()


EXT4_IOC_SHUTDOWN = 0x8004587D  # _IOR('X', 125, __u32), what `xfs_io -x -c shutdown` calls
EXT4_GOING_FLAGS_NOLOGFLUSH = 2


def make_read_only(folder, device):
    """An error, as ext4 meets one, makes it remount itself read-only (errors=remount-ro)."""
    (pathname,) = glob.glob(f'/sys/fs/ext4/{os.path.basename(device)}/trigger_fs_error')
    with open(pathname, 'w') as trigger:
        trigger.write('1')


def shut_down(folder, device):
    """Every I/O fails from now on, as on a disk gone bad."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        fcntl.ioctl(descriptor, EXT4_IOC_SHUTDOWN, struct.pack('I', EXT4_GOING_FLAGS_NOLOGFLUSH))
    finally:
        os.close(descriptor)


@one_engine
@pytest.mark.parametrize('fault, words', [
    (make_read_only, ': the filesystem is read-only'), (shut_down, ': I/O error')],
    ids=['read-only', 'I/O error'])
def test_a_failing_filesystem_makes_the_service_unready(service_env, tmp_path, fault, words):
    require_root()
    log_path = tmp_path / 'gunicorn.log'
    with ext4_loop(tmp_path) as (folder, device):
        service = service_on(folder, service_env, log_path)
        try:
            assert statuses(service, 'POST', '/person', 1, person(1)) == [201]
            fault(folder, device)
            unready = seconds_until(lambda: all_ready(service, 503), timeout=10)
            print(f'/readyz 503 {unready} s after the fault')
            assert statuses(service, 'POST', '/person', 3, person(2)) == [503] * 3
        finally:
            service.kill()
    lines = error_lines(log_path, 'database writes fail: SQLITE_')
    assert lines and set(lines.values()) == {1}
    assert all(words in line for line in log_path.read_text().splitlines()
               if 'database writes fail' in line)

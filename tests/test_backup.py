"""Corruption found, not served, and backups that restore: the start's integrity check,
`python models.py check | backup FILE | restore FILE`, on real files under a real gunicorn."""

import contextlib
import hashlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import backup
import models
from support import ROOT, Service, free_port, one_engine, wait_until
from test_service import person

def run(*arguments, url):
    """`python models.py ARGUMENTS` against `url`; returns the finished process."""
    return subprocess.run([sys.executable, 'models.py', *arguments], cwd=ROOT, text=True,
                          capture_output=True, timeout=120, env={**os.environ, 'DATABASE_URL': url})


def lines(text):
    return [line for line in text.splitlines() if line.strip()]


def file_of(url):
    return Path(url.removeprefix('sqlite:///'))


def fill(url, count, start=0):
    """Register `count` people straight into the database, and close it."""
    with models.db.connection_context():
        with models.db.atomic():
            for number in range(start, start + count):
                fields = person(number)
                models.insert(models.Person, **fields, email_key=models.email_key(fields['email']))


def corrupt_a_page(path):
    """Overwrite one page in the middle of the file, as a failing disk or a stray write would."""
    with sqlite3.connect(path) as connection:
        (page_size,), = connection.execute('PRAGMA page_size')
        (pages,), = connection.execute('PRAGMA page_count')
    connection.close()
    with open(path, 'r+b') as file:
        file.seek((pages // 2) * page_size)
        file.write(b'\xa5' * page_size)


def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest() if Path(path).exists() else None


# --- The integrity check, at start and by hand ---------------------------------------------

@one_engine
def test_the_start_refuses_a_corrupt_file_in_one_line_without_a_worker(database_url, tmp_path):
    fill(database_url, 3000)
    models.db.close()
    corrupt_a_page(file_of(database_url))
    started = subprocess.run(
        [sys.executable, '-m', 'gunicorn', '--bind', f'127.0.0.1:{free_port()}'], cwd=ROOT,
        env={**os.environ, 'DATABASE_URL': database_url, 'SMTP_PORT': '1'},
        capture_output=True, text=True, timeout=60)
    output = started.stdout + started.stderr
    assert started.returncode != 0
    assert 'Traceback' not in output and 'Booting worker' not in output, output
    (error,) = [line for line in lines(started.stderr) if not line.startswith('[')]
    assert 'is corrupt (quick_check' in error and '`models.py restore FILE`' in error


@one_engine
def test_check_by_hand_says_ok_or_corrupt_in_one_line(database_url):
    fill(database_url, 3000)
    models.db.close()
    good = run('check', url=database_url)
    assert (good.returncode, len(lines(good.stdout)), good.stderr) == (0, 1, '')
    assert 'ok (quick_check' in good.stdout
    corrupt_a_page(file_of(database_url))
    bad = run('check', url=database_url)
    assert (bad.returncode, bad.stdout, len(lines(bad.stderr))) == (1, '', 1)
    assert 'is corrupt' in bad.stderr and 'restore' in bad.stderr


def test_a_file_that_is_no_database_is_corrupt(tmp_path):
    path = tmp_path / 'persons.db'
    path.write_bytes(os.urandom(8192))
    result = run('check', url=f'sqlite:///{path}')
    assert result.returncode == 1 and 'SQLITE_NOTADB' in result.stderr, result.stderr


@one_engine
def test_the_check_never_writes_a_foreign_wal_into_the_file(database_url, tmp_path):
    """An operator restored by hand: a copy moved over persons.db after a kill -9 left the
    old file's -wal beside it. Opened read-write and closed, SQLite would copy that WAL into
    the copy, damaging it for good; the check leaves both as they were."""
    path = file_of(database_url)
    fill(database_url, 500)
    models.db.close()
    shutil.copy(path, tmp_path / 'copy.db')
    writer = subprocess.Popen([sys.executable, '-c', (
        'import sqlite3, sys, time\n'
        f'c = sqlite3.connect({str(path)!r}, isolation_level=None)\n'
        'c.execute("PRAGMA wal_autocheckpoint = 0")\n'
        'c.execute("UPDATE person SET first_name = \'Overwritten\'")\n'
        'c.execute("DELETE FROM person WHERE id % 3 = 0")\n'
        'print("written", flush=True); time.sleep(60)')], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline() == 'written\n'
    writer.send_signal(signal.SIGKILL)  # the WAL stays, never checkpointed
    writer.wait()
    os.replace(tmp_path / 'copy.db', path)
    before = digest(path), digest(f'{path}-wal')
    assert before[1] is not None
    with contextlib.suppress(backup.DatabaseCorrupt):  # refusing is right; writing is not
        backup.check(str(path))
    assert (digest(path), digest(f'{path}-wal')) == before


# --- Backup -----------------------------------------------------------------------------------

class Registrations:
    """Threads that register people on the service until stopped, each 201 noted with the
    time its answer arrived."""

    def __init__(self, service, threads=4):
        self.service, self.answered, self._stop = service, [], threading.Event()
        self._threads = [threading.Thread(target=self._register, args=(n,)) for n in range(threads)]

    def _register(self, thread):
        number = 0
        while not self._stop.is_set():
            number += 1
            status, _, body = self.service.request('POST', '/person',
                                                   person(f'{thread}-{number}'))
            if status == 201:
                self.answered.append((time.monotonic(), body['id']))

    def __enter__(self):
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def before(self, moment):
        return {person_id for answered_at, person_id in list(self.answered) if answered_at < moment}


def people_in(path):
    with contextlib.closing(sqlite3.connect(f'file:{path}?mode=ro', uri=True)) as connection:
        return {person_id for (person_id,) in connection.execute('SELECT id FROM person')}


@one_engine
def test_a_backup_taken_under_writes_holds_every_201_before_it_began(database_url, service_env,
                                                                      tmp_path):
    fill(database_url, 50_000)
    service = Service(service_env, log_path=tmp_path / 'gunicorn.log').start()
    target = tmp_path / 'backups' / 'persons-backup.db'
    target.parent.mkdir()
    try:
        with Registrations(service) as registrations:
            assert wait_until(lambda: len(registrations.answered) >= 20)
            began = time.monotonic()
            result = run('backup', str(target), url=database_url)
            ended = time.monotonic()
            assert wait_until(lambda: registrations.before(time.monotonic()) - registrations.before(ended))
    finally:
        service.kill()
    assert result.returncode == 0, result.stderr
    assert len(lines(result.stdout)) == 1 and 'integrity_check ok' in result.stdout
    backed_up = people_in(target)
    assert registrations.before(began) <= backed_up
    assert len(backed_up) >= 50_000 + len(registrations.before(began))
    with contextlib.closing(sqlite3.connect(target)) as copy:
        assert copy.execute('PRAGMA integrity_check').fetchall() == [('ok',)]
    assert sorted(os.listdir(target.parent)) == [target.name]  # one whole file, nothing beside
    print(f'backup of {len(backed_up)} people under writes: {ended - began:.2f} s')


@one_engine
def test_a_backup_never_replaces_a_file_unless_forced(database_url, tmp_path):
    fill(database_url, 10)
    models.db.close()
    target = tmp_path / 'kept.db'
    target.write_bytes(b'an earlier backup')
    refused = run('backup', str(target), url=database_url)
    assert refused.returncode == 1 and 'exists' in refused.stderr and '--force' in refused.stderr
    assert target.read_bytes() == b'an earlier backup'
    forced = run('backup', '--force', str(target), url=database_url)
    assert forced.returncode == 0, forced.stderr
    assert len(people_in(target)) == 10


@pytest.fixture
def full_folder(tmp_path):
    """A 256 KiB tmpfs, nearly filled: too small for a backup."""
    folder = tmp_path / 'small'
    folder.mkdir()
    mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=256k', 'tmpfs', str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f'cannot mount a tmpfs here (root needed): {mounted.stderr.strip()}')
    try:
        (folder / 'ballast').write_bytes(b'\0' * 200 * 1024)
        yield folder
    finally:
        subprocess.run(['umount', '-l', str(folder)], check=True)


@one_engine
def test_a_backup_that_cannot_be_written_leaves_no_file(database_url, full_folder):
    fill(database_url, 3000)
    models.db.close()
    target = full_folder / 'persons-backup.db'
    result = run('backup', str(target), url=database_url)
    assert result.returncode == 1 and len(lines(result.stderr)) == 1, result.stderr
    assert 'Traceback' not in result.stderr
    assert sorted(os.listdir(full_folder)) == ['ballast']


# --- Restore ----------------------------------------------------------------------------------

@one_engine
def test_restore_refuses_while_an_idle_service_has_the_database_open(database_url, service,
                                                                      tmp_path):
    path = file_of(database_url)
    snapshot = tmp_path / 'snapshot.db'
    assert run('backup', str(snapshot), url=database_url).returncode == 0
    files = {name: digest(name) for name in (path, f'{path}-wal', f'{path}-shm')}
    refused = run('restore', str(snapshot), url=database_url)
    assert refused.returncode == 1 and len(lines(refused.stderr)) == 1
    assert 'is open in another process' in refused.stderr
    assert {name: digest(name) for name in files} == files
    assert not list(path.parent.glob('*.replaced-*'))


def kept_database(path, suffix, folder):
    """The database moved aside by restore, with its own WAL, opened where it can be read."""
    folder.mkdir()
    for part in ('', '-wal'):
        kept = Path(f'{path}{part}.{suffix}')
        if kept.exists():
            shutil.copy(kept, folder / f'kept.db{part}')
    return people_in(folder / 'kept.db')


@one_engine
def test_restore_moves_the_old_files_aside_and_the_restored_database_serves(
        database_url, service_env, tmp_path):
    path = file_of(database_url)
    service = Service(service_env, log_path=tmp_path / 'gunicorn.log').start()
    before = [service.request('POST', '/person', person(n))[2]['id'] for n in range(5)]
    snapshot = tmp_path / 'snapshot.db'
    assert run('backup', str(snapshot), url=database_url).returncode == 0
    after = service.request('POST', '/person', person(99))[2]['id']
    service.kill()  # kill -9: the last write is in the -wal, never checkpointed
    assert Path(f'{path}-wal').stat().st_size > 0
    restored = run('restore', str(snapshot), url=database_url)
    assert restored.returncode == 0, restored.stderr
    assert len(lines(restored.stdout)) == 1 and '5 people' in restored.stdout
    kept = {name.name for name in path.parent.glob('persons.db*.replaced-*')}
    (suffix,) = {name.rpartition('.')[2] for name in kept}
    assert suffix.startswith('replaced-') and suffix.endswith('Z')
    assert kept == {f'persons.db.{suffix}', f'persons.db-shm.{suffix}', f'persons.db-wal.{suffix}'}
    assert not Path(f'{path}-wal').exists()
    assert after in kept_database(path, suffix, tmp_path / 'kept')
    service = Service(service_env, log_path=tmp_path / 'gunicorn.log').start()
    try:
        assert [service.request('GET', f'/person/{n}')[0] for n in before] == [200] * 5
        assert service.request('GET', f'/person/{after}')[0] == 404
        assert service.request('POST', '/person', person(100))[0] == 201
    finally:
        service.kill()


@one_engine
def test_restore_refuses_a_corrupt_snapshot_and_changes_nothing(database_url, tmp_path):
    fill(database_url, 3000)
    models.db.close()
    path = file_of(database_url)
    snapshot = tmp_path / 'snapshot.db'
    assert run('backup', str(snapshot), url=database_url).returncode == 0
    corrupt_a_page(snapshot)
    current = digest(path), sorted(os.listdir(path.parent))
    refused = run('restore', str(snapshot), url=database_url)
    assert refused.returncode == 1 and 'is corrupt (integrity_check' in refused.stderr
    assert (digest(path), sorted(os.listdir(path.parent))) == current


@one_engine
def test_restore_refuses_a_schema_newer_than_the_code(database_url, tmp_path):
    models.SchemaVersion.create(version=models.SCHEMA_VERSION + 1)
    models.db.close()
    snapshot = tmp_path / 'snapshot.db'
    assert run('backup', str(snapshot), url=database_url).returncode == 0
    refused = run('restore', str(snapshot), url=database_url)
    assert refused.returncode == 1
    assert f'schema version {models.SCHEMA_VERSION + 1}, newer' in refused.stderr


def test_restore_takes_an_older_schema_and_the_start_migrates_it(tmp_path):
    url = f'sqlite:///{tmp_path}/data/persons.db'
    restored = run('restore', str(ROOT / 'tests' / 'schema_v1' / 'sqlite.db'), url=url)
    assert restored.returncode == 0, restored.stderr
    assert 'schema version 1' in restored.stdout
    service = Service({'DATABASE_URL': url, 'SMTP_PORT': '1'}).start()
    try:
        assert service.request('GET', '/person/2')[2] == {'id': 2, 'email': 'Jose@Example.com'}
    finally:
        service.kill()


# --- PostgreSQL and MariaDB -------------------------------------------------------------------

def test_on_a_server_backup_and_restore_name_its_tools_and_check_says_what_it_checked(
        database_url, tmp_path):
    if database_url.startswith('sqlite'):
        pytest.skip('SQLite: backups of its file are tested above')
    models.db.close()
    tools = (['pg_dump', 'pg_restore'] if database_url.startswith('postgres') else
             ['mariadb-dump', 'the mariadb client'])
    for command, tool in zip(('backup', 'restore'), tools):
        result = run(command, str(tmp_path / 'x.db'), url=database_url)
        assert (result.returncode, result.stdout, len(lines(result.stderr))) == (1, '', 1)
        assert tool in result.stderr and 'docs/backup.md' in result.stderr
    assert not (tmp_path / 'x.db').exists()
    checked = run('check', url=database_url)
    assert checked.returncode == 0 and len(lines(checked.stdout)) == 1, checked.stderr
    assert f'schema version {models.SCHEMA_VERSION}' in checked.stdout

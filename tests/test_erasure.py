"""DELETE erases: on SQLite no byte of the person is left in the database file, its WAL or
its shared-memory file soon after the 204, also across a kill -9."""

import time
from pathlib import Path

import pytest

import models
from support import Service, wait_until

SECRET = {'first_name': 'Zenobia', 'last_name': 'Quillfeather', 'email': 'zq.secret@example.com'}
CORRECTED = 'zq.corrected@example.com'


@pytest.fixture
def sqlite_env(service_env):
    if not service_env['DATABASE_URL'].startswith('sqlite'):
        pytest.skip('the files are SQLite\'s; a server keeps its own storage (README)')
    return service_env


def database_files(env):
    path = Path(env['DATABASE_URL'].removeprefix('sqlite:///'))
    return [path, Path(f'{path}-wal'), Path(f'{path}-shm')]


def traces(env):
    """The files that still hold any of the person's bytes, with what they hold."""
    needles = [SECRET['first_name'], SECRET['last_name'], SECRET['email'], CORRECTED,
               models.email_key(SECRET['email']), models.email_key(CORRECTED)]
    found = {}
    for path in database_files(env):
        data = path.read_bytes() if path.exists() else b''
        found.update({f'{path.name}: {needle}': True for needle in needles
                      if needle.encode() in data})
    return found


def register_and_delete(service, smtp):
    """A person whose mail went out and whose address was corrected, then deleted."""
    for number in range(20):  # neighbours on the same pages, which must survive
        assert service.request('POST', '/person', {
            'first_name': 'Other', 'last_name': f'Person {number}',
            'email': f'other{number}@example.com'})[0] == 201
    person_id = service.request('POST', '/person', SECRET)[2]['id']
    assert smtp.wait_for(21) == 21
    assert service.request('PATCH', f'/person/{person_id}', {'email': CORRECTED})[0] == 200
    assert service.request('DELETE', f'/person/{person_id}')[0] == 204


def test_a_deleted_person_leaves_no_bytes_in_the_sqlite_files(sqlite_env, smtp, tmp_path):
    service = Service(sqlite_env, log_path=tmp_path / 'gunicorn.log').start()
    try:
        register_and_delete(service, smtp)
        started = time.monotonic()
        assert wait_until(lambda: not traces(sqlite_env), timeout=60), traces(sqlite_env)
        print(f'no trace left {time.monotonic() - started:.2f} s after the 204')
        assert service.request('GET', '/person/20')[2]['email'] == 'other19@example.com'
    finally:
        service.kill()


def test_no_bytes_are_left_after_a_kill_9_right_after_the_204(sqlite_env, smtp, tmp_path):
    service = Service(sqlite_env, log_path=tmp_path / 'gunicorn.log').start()
    register_and_delete(service, smtp)
    service.kill()
    restarted = Service(sqlite_env, log_path=tmp_path / 'gunicorn.log').start()
    try:
        assert wait_until(lambda: not traces(sqlite_env), timeout=60), traces(sqlite_env)
        assert restarted.request('GET', '/person/1')[0] == 200
    finally:
        restarted.kill()

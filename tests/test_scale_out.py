"""Several services on one database, and a database server that goes away and comes back."""

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time

import pytest

from support import Service, SmtpSink, free_port, wait_until
from test_service import assert_one_mail_per_person, in_parallel, person


@pytest.fixture
def two_services(service_env, tmp_path):
    services = [Service(service_env, workers=2, log_path=tmp_path / f'service{n}.log').start()
                for n in range(2)]
    yield services
    for service in services:
        service.kill()


def test_two_services_send_each_mail_exactly_once(two_services, smtp):
    assert_one_mail_per_person(two_services, smtp, 40)


def test_two_services_agree_on_a_contested_email(two_services):
    statuses = in_parallel([lambda n=n: two_services[n % 2].request('POST', '/person', person(7))[0]
                            for n in range(20)], threads=20)
    assert sorted(statuses) == [201] + [409] * 19


# --- A PostgreSQL server of the test's own, stopped and started -----------------------------

def _postgres_bin():
    found = sorted(glob.glob('/usr/lib/postgresql/*/bin/pg_ctl'))
    return os.path.dirname(found[-1]) if found else None


class ThrowawayPostgres:
    """A PostgreSQL cluster in a temporary folder on a free port, run as the postgres user
    when the tests run as root (PostgreSQL refuses to run as root)."""

    def __init__(self, bin_dir):
        self.bin_dir, self.port = bin_dir, free_port()
        self.root = tempfile.mkdtemp(prefix='personapi-pg-')
        self.data = os.path.join(self.root, 'data')
        self.as_user = []
        if os.geteuid() == 0:
            account = pwd.getpwnam('postgres')
            os.chown(self.root, account.pw_uid, account.pw_gid)
            self.as_user = ['runuser', '-u', 'postgres', '--']
        self._run('initdb', '-D', self.data, '-U', 'postgres', '--auth=trust', '-N')
        self.url = f'postgresql://postgres@127.0.0.1:{self.port}/postgres'

    def _run(self, tool, *args):
        subprocess.run(self.as_user + [os.path.join(self.bin_dir, tool), *args], check=True,
                       capture_output=True, timeout=60)

    def start(self):
        options = f'-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c fsync=off'
        self._run('pg_ctl', '-D', self.data, '-o', options, '-l', os.path.join(self.root, 'log'),
                  '-w', 'start')

    def stop(self):
        self._run('pg_ctl', '-D', self.data, '-m', 'fast', '-w', 'stop')

    def remove(self):
        try:
            self.stop()
        except subprocess.CalledProcessError:
            pass  # already stopped
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def throwaway_postgres():
    bin_dir = _postgres_bin()
    if bin_dir is None or not shutil.which('runuser'):
        pytest.skip('no PostgreSQL server binaries (pg_ctl, initdb) on this machine')
    server = ThrowawayPostgres(bin_dir)
    server.start()
    yield server
    server.remove()


def timed(service, method, path, body=None):
    started = time.monotonic()
    status, _, reply = service.request(method, path, body, timeout=30)
    return status, reply, time.monotonic() - started


@pytest.mark.parametrize('scheme', ['postgresql', 'postgresql+pool'])
def test_the_service_rides_out_a_database_restart(throwaway_postgres, tmp_path, scheme):
    sink = SmtpSink().start()
    url = throwaway_postgres.url.replace('postgresql', scheme, 1)
    service = Service({'DATABASE_URL': url, 'SMTP_HOST': '127.0.0.1', 'SMTP_PORT': str(sink.port),
                       'MAIL_MAX_BACKOFF': '1', 'RATE_LIMIT': 'off'},
                      log_path=tmp_path / 'gunicorn.log').start()
    try:
        ids = [timed(service, 'POST', '/person', person(n))[1]['id'] for n in range(5)]
        assert sink.wait_for(5) == 5  # recorded as sent before the server goes
        throwaway_postgres.stop()
        while_down = [timed(service, 'GET', '/readyz'), timed(service, 'POST', '/person', person(9)),
                      timed(service, 'GET', f'/person/{ids[0]}'), timed(service, 'GET', '/readyz')]
        assert [status for status, _, _ in while_down] == [503] * 4
        assert all(reply['title'] == 'Database unavailable' for _, reply, _ in while_down)
        assert max(seconds for _, _, seconds in while_down) < 6  # the connect timeout, not a hang
        assert timed(service, 'GET', '/healthz')[0] == 200  # the process itself is fine

        throwaway_postgres.start()
        assert wait_until(lambda: timed(service, 'GET', '/readyz')[0] == 200, timeout=20)
        assert wait_until(lambda: all(timed(service, 'GET', f'/person/{i}')[0] == 200 for i in ids),
                          timeout=10)
        assert timed(service, 'POST', '/person', person(10))[0] == 201
        assert sink.wait_for(6, timeout=20) == 6  # the courier reconnected by itself
    finally:
        service.kill()
        sink.stop()

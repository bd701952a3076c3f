"""End to end against a real `gunicorn personapi:app` with two workers."""

import concurrent.futures
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

import models
from support import ROOT, Service, SmtpSink, free_port, one_engine, wait_until


def person(number):
    return {'first_name': 'Ada', 'last_name': f'Lovelace {number}',
            'email': f'ada{number}@example.com'}


def in_parallel(calls, threads=16):
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda call: call(), calls))


def test_parallel_posts_of_one_email_create_exactly_one_person(service):
    statuses = [status for status, _, _ in in_parallel(
        [lambda: service.request('POST', '/person', person(1))] * 20, threads=20)]
    assert sorted(statuses) == [201] + [409] * 19


def test_200_parallel_posts_all_succeed(service, tmp_path):
    results = in_parallel([lambda n=n: service.request('POST', '/person', person(n))
                           for n in range(200)])
    assert [status for status, _, _ in results] == [201] * 200
    assert len({body['id'] for _, _, body in results}) == 200
    assert 'database is locked' not in (tmp_path / 'gunicorn.log').read_text()


def test_every_acknowledged_write_survives_kill_9(service, service_env, tmp_path):
    ids = [service.request('POST', '/person', person(n))[2]['id'] for n in range(50)]
    service.kill()  # right after the last 201: master and workers die at once
    restarted = Service(service_env, log_path=tmp_path / 'gunicorn.log').start()
    try:
        assert [restarted.request('GET', f'/person/{i}')[0] for i in ids] == [200] * 50
    finally:
        restarted.kill()


def assert_one_mail_per_person(services, smtp, count):
    """POST `count` people spread over `services`; each must get exactly one mail."""
    results = in_parallel([lambda n=n: services[n % len(services)].request('POST', '/person', person(n))
                           for n in range(count)], threads=8)
    assert [status for status, _, _ in results] == [201] * count
    assert smtp.wait_for(count, timeout=20) == count
    time.sleep(1.5)  # a duplicate would arrive now
    assert smtp.recipients() == sorted(f'ada{n}@example.com' for n in range(count))


def test_one_mail_per_person_with_two_workers(service, smtp):
    assert_one_mail_per_person([service], smtp, 30)


def test_smtp_down_slows_nothing_and_loses_nothing(service_env, tmp_path):
    sink = SmtpSink(port=free_port())  # not started yet: connections are refused
    env = {**service_env, 'SMTP_PORT': str(sink.port)}
    service = Service(env, log_path=tmp_path / 'gunicorn.log').start()
    try:
        durations = []
        for n in range(20):
            started = time.monotonic()
            assert service.request('POST', '/person', person(n))[0] == 201
            durations.append(time.monotonic() - started)
        assert max(durations) < 1.0
        sink.start()
        try:
            assert sink.wait_for(20, timeout=20) == 20
        finally:
            sink.stop()
    finally:
        service.kill()


def test_mail_pending_at_shutdown_is_sent_after_a_restart(service_env, tmp_path):
    sink = SmtpSink(port=free_port())
    env = {**service_env, 'SMTP_PORT': str(sink.port)}
    service = Service(env, log_path=tmp_path / 'gunicorn.log').start()
    for n in range(5):
        assert service.request('POST', '/person', person(n))[0] == 201
    service.stop()
    assert service.process.returncode == 0
    sink.start()
    restarted = Service(env, log_path=tmp_path / 'gunicorn.log').start()
    try:
        assert sink.wait_for(5, timeout=20) == 5
    finally:
        restarted.kill()
        sink.stop()


def test_sigterm_stops_gracefully_and_promptly(service):
    started = time.monotonic()
    service.process.send_signal(signal.SIGTERM)
    assert service.process.wait(15) == 0
    assert time.monotonic() - started < 10


def port_is_free(port):
    """Whether a new service may listen on `port`: gunicorn.conf.py's own check."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(('127.0.0.1', port))
        except OSError:
            return False
        return True


def running(pid):
    """Whether the process `pid` runs (a zombie has ended: its reaper may be slow)."""
    try:
        with open(f'/proc/{pid}/stat') as stat:
            return stat.read().rpartition(')')[2].split()[0] != 'Z'
    except FileNotFoundError:
        return False


@one_engine
def test_a_killed_masters_workers_end_at_once_and_free_the_port(service_env, tmp_path):
    service = Service(service_env, log_path=tmp_path / 'gunicorn.log').start()
    master = service.process.pid
    with open(f'/proc/{master}/task/{master}/children') as children:
        workers = [int(pid) for pid in children.read().split()]
    clients = []
    try:
        for _ in range(8):  # clients the workers would wait for: heads trickling in, bodies stalled
            client = socket.create_connection(('127.0.0.1', service.port))
            client.sendall(b'POST /person HTTP/1.1\r\nHost: x\r\nContent-Length: 99\r\n')
            clients.append(client)
        for client in clients[::2]:
            client.sendall(b'Content-Type: application/json\r\n\r\n{')
        killed = time.monotonic()
        os.kill(master, signal.SIGKILL)
        assert wait_until(lambda: port_is_free(service.port), timeout=5)
        freed = time.monotonic() - killed
        assert wait_until(lambda: not any(running(pid) for pid in workers), timeout=5)
        print(f'port free {freed:.1f} s, workers gone {time.monotonic() - killed:.1f} s '
              'after the master was killed')
        Service(service_env, port=service.port, log_path=tmp_path / 'gunicorn.log').start().kill()
    finally:
        for client in clients:
            client.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(master, signal.SIGKILL)  # the workers, if still there


def test_the_master_holds_no_database_connection_to_share_with_workers(service, service_env):
    """Connections are opened after the fork, by each worker, never inherited."""
    if not service_env['DATABASE_URL'].startswith('sqlite'):
        pytest.skip('checked on the SQLite file, whose open descriptors /proc shows')
    assert service.request('POST', '/person', person(1))[0] == 201
    database_file = service_env['DATABASE_URL'].removeprefix('sqlite:///')

    def open_files(pid):
        folder = f'/proc/{pid}/fd'
        return {os.path.realpath(os.path.join(folder, fd)) for fd in os.listdir(folder)}
    master = service.process.pid
    with open(f'/proc/{master}/task/{master}/children') as children:
        workers = [int(pid) for pid in children.read().split()]
    assert database_file not in open_files(master)
    assert any(database_file in open_files(worker) for worker in workers)


def test_models_migrate_creates_the_schema_and_can_run_again(service_env):
    models.db.drop_tables(models.MODELS)
    models.db.close()
    env = {**os.environ, 'DATABASE_URL': service_env['DATABASE_URL']}
    for _ in range(2):  # idempotent
        result = subprocess.run([sys.executable, 'models.py', 'migrate'], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
    assert set(models.db.get_tables()) >= {'person', 'outbox', 'schema_version'}


# --- Mail, end to end -----------------------------------------------------------------------

def test_hostile_names_reach_the_relay_as_plain_text_in_one_mail_each(service, smtp):
    from test_mailer import HOSTILE_NAMES, assert_one_faithful_mail

    for number, name in enumerate(HOSTILE_NAMES):
        body = {'first_name': name, 'last_name': 'X', 'email': f'hostile{number}@example.com'}
        assert service.request('POST', '/person', body)[0] == 201
        assert smtp.wait_for(1) == 1
        assert_one_faithful_mail(smtp, body)
        smtp.messages.clear()


def test_no_mail_reaches_a_person_deleted_while_smtp_was_down(service_env, tmp_path):
    sink = SmtpSink(port=free_port())  # not started yet: connections are refused
    service = Service({**service_env, 'SMTP_PORT': str(sink.port)},
                      log_path=tmp_path / 'gunicorn.log').start()
    try:
        kept = service.request('POST', '/person', person(1))[2]['id']
        deleted = service.request('POST', '/person', person(2))[2]['id']
        assert service.request('DELETE', f'/person/{deleted}')[0] == 204
        sink.start()
        assert sink.wait_for(1, timeout=20) == 1
        time.sleep(6)  # past the next poll: the deleted person's mail would arrive now
        assert sink.recipients() == [person(1)['email']]
        assert service.request('GET', f'/person/{kept}')[0] == 200
    finally:
        service.kill()
        sink.stop()


def test_a_relay_refusing_mail_from_for_a_while_loses_nothing(service_env, tmp_path):
    sink = SmtpSink().start()
    sink.mail_reply = '530 5.7.0 Authentication required'
    log_path = tmp_path / 'gunicorn.log'
    service = Service({**service_env, 'SMTP_PORT': str(sink.port)}, log_path=log_path).start()
    try:
        for number in range(5):
            assert service.request('POST', '/person', person(number))[0] == 201
        time.sleep(3)
        assert sink.received() == []
        sink.mail_reply = None  # the relay is fixed
        assert sink.wait_for(5, timeout=20) == 5
    finally:
        service.kill()
        sink.stop()
    assert 'SMTPSenderRefused 530' in log_path.read_text()


# Root writes anywhere: drop the capabilities that let it, so the permission bits bind.
AS_AN_ORDINARY_USER = (['setpriv', '--bounding-set=-dac_override,-dac_read_search,-fowner']
                       if os.getuid() == 0 else [])


@pytest.mark.skipif(os.getuid() == 0 and not shutil.which('setpriv'),
                    reason='running as root without setpriv: every folder is writable')
@pytest.mark.parametrize('database', ['persons.db', 'missing/persons.db'])
def test_an_unwritable_database_folder_stops_the_start_in_one_line(tmp_path, database):
    read_only = tmp_path / 'data'
    read_only.mkdir(mode=0o555)
    path = read_only / database
    result = subprocess.run(
        [*AS_AN_ORDINARY_USER, sys.executable, '-m', 'gunicorn', '--bind',
         f'127.0.0.1:{free_port()}'], cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**os.environ, 'DATABASE_URL': f'sqlite:///{path}', 'SMTP_PORT': '1'})
    assert result.returncode == 1
    assert 'Traceback' not in result.stderr
    (error,) = [line for line in result.stderr.splitlines() if 'not writable' in line]
    assert error == (f'Error: the database folder {path.parent} is not writable by UID '
                     f'{os.getuid()}: give that user write access to it (for a volume: chown '
                     f'{os.getuid()} on it, or the initContainer in deploy.yaml), or point '
                     'DATABASE_URL at a writable folder')


@pytest.fixture
def read_only_folder(tmp_path):
    """A filesystem mounted read-only (a tmpfs), unmounted after the test."""
    folder = tmp_path / 'read-only'
    folder.mkdir()
    if os.getuid() != 0 or not shutil.which('mount'):
        pytest.skip('mounting a read-only filesystem needs root')
    subprocess.run(['mount', '-t', 'tmpfs', '-o', 'ro,size=1m', 'tmpfs', str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(['umount', str(folder)], check=True)


def test_a_read_only_filesystem_stops_the_start_in_one_line_naming_it(read_only_folder):
    result = subprocess.run(
        [sys.executable, '-m', 'gunicorn', '--bind', f'127.0.0.1:{free_port()}'], cwd=ROOT,
        capture_output=True, text=True, timeout=60,
        env={**os.environ, 'DATABASE_URL': f'sqlite:///{read_only_folder}/persons.db',
             'SMTP_PORT': '1'})
    assert result.returncode == 1
    assert 'Traceback' not in result.stderr
    (error,) = [line for line in result.stderr.splitlines() if 'database folder' in line]
    assert error == (f'Error: the database folder {read_only_folder} is on a read-only '
                     'filesystem: mount it read-write, or point DATABASE_URL at a writable '
                     'folder')

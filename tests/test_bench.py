"""The benchmark's ceilings: the service's gunicorn settings, and a mail ceiling whose mail is real."""

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from gunicorn.app.base import Application
from gunicorn.config import KNOWN_SETTINGS

from bench import instructions, run
from support import SmtpSink, http

ROOT = Path(__file__).resolve().parent.parent


def settings(path):
    """A gunicorn settings file as gunicorn reads it; the environment it sets for its own
    processes (the metrics directory) is not left behind in this one."""
    environ = dict(os.environ)
    try:
        return Application.get_config_from_filename(None, str(ROOT / path))
    finally:
        os.environ.clear()
        os.environ.update(environ)


SERVICE = settings('gunicorn.conf.py')
CEILING = settings('bench/gunicorn_ceiling.conf.py')
HOOKS = {setting.name for setting in KNOWN_SETTINGS if setting.section == 'Server Hooks'}
SETTINGS = sorted(setting.name for setting in KNOWN_SETTINGS
                  if setting.name not in HOOKS and setting.name != 'wsgi_app')


@pytest.mark.parametrize('name', SETTINGS)
def test_the_ceilings_run_under_every_setting_of_the_service(name):
    assert CEILING.get(name) == SERVICE.get(name)


def test_the_ceilings_keep_none_of_the_services_hooks():
    assert {name for name in HOOKS if name in CEILING} == {'post_worker_init'}
    assert CEILING['post_worker_init'] is not SERVICE['post_worker_init']


@pytest.fixture
def mail_ceiling(tmp_path):
    run.WORK.mkdir(exist_ok=True)
    database = tmp_path / 'ceiling.db'
    run.seed(database, 1)
    sink = SmtpSink().start()
    try:
        with run.serve(run.MAIL, database, sink.port, [], 'test-mail') as server:
            yield database, sink, f'http://127.0.0.1:{server.port}'
    finally:
        sink.stop()


NAMES = [('Ada', 'Lovelace'), ('Grace', 'Hopper'), ('Edsger', 'Dijkstra')]


def test_the_mail_ceiling_sends_one_valid_mail_per_person_and_deletes_its_row(mail_ceiling):
    database, sink, url = mail_ceiling
    for first, last in NAMES:
        body = {'first_name': first, 'last_name': last, 'email': f'{first.lower()}@example.org'}
        assert http('POST', f'{url}/person', body)[0] == 201
    assert sink.wait_for(len(NAMES)) == len(NAMES)
    received = {mail.rcpt_tos[0]: mail for mail in sink.received()}
    assert sorted(received) == sorted(f'{first.lower()}@example.org' for first, _ in NAMES)
    for first, last in NAMES:
        mail = received[f'{first.lower()}@example.org']
        message = mail.message
        assert mail.mail_from == 'no-reply@personapi.local'
        assert message['To'] == f'{first.lower()}@example.org'
        assert message['Subject'] == f'Welcome, {first} {last}!'
        assert message.get_content_type() == 'text/plain' and not message.defects
        assert message.get_content().startswith(f'Hello {first} {last},')
    with sqlite3.connect(database) as connection:
        assert connection.execute('SELECT count(*) FROM outbox').fetchone() == (0,)


@pytest.fixture(scope='module')
def seeded(tmp_path_factory):
    database = tmp_path_factory.mktemp('instructions') / 'persons.db'
    run.seed(database, 20)
    return database


@pytest.mark.parametrize('app_spec', instructions.APPS.values())
def test_each_counted_app_answers_every_get_it_is_counted_on(seeded, app_spec):
    answered = subprocess.run(
        [sys.executable, 'bench/instructions.py', '--answer', app_spec, '50', '20'], cwd=ROOT,
        env={**os.environ, 'PYTHONPATH': str(ROOT), 'DATABASE_URL': f'sqlite:///{seeded}'},
        capture_output=True, text=True)
    assert answered.returncode == 0, answered.stderr[-2000:]


@pytest.mark.skipif(not shutil.which('valgrind'), reason='valgrind is not installed')
def test_instructions_are_counted_per_request_and_the_service_costs_more(seeded):
    counts = instructions.measure(seeded, 20, few=10, many=40)
    assert 0 < counts['bare ceiling'] < counts['personapi']
    assert instructions.report(counts)[0].endswith('| 1.00× |')

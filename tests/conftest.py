"""Fixtures: every database test runs once per engine (SQLite always; PostgreSQL and
MySQL/MariaDB when TEST_POSTGRES_URL / TEST_MYSQL_URL name a server), each on a fresh database.
The run ends with one line per reason tests were skipped, not one per test."""

import collections
import os
import uuid
from urllib.parse import urlsplit, urlunsplit

import peewee
import pytest
import webtest
from playhouse import db_url

import mailer
import models
import personapi
from config import Config
from support import Service, SmtpSink

SERVER_ENGINES = {'postgres': 'TEST_POSTGRES_URL', 'mysql': 'TEST_MYSQL_URL'}


def pytest_terminal_summary(terminalreporter):
    """How many tests each reason skipped: an engine without its server skips hundreds."""
    skipped = terminalreporter.stats.get('skipped', [])
    reasons = collections.Counter(report.longrepr[2].removeprefix('Skipped: ')
                                  for report in skipped if isinstance(report.longrepr, tuple))
    for reason, count in reasons.most_common():
        tests = 'test' if count == 1 else 'tests'
        terminalreporter.write_line(f'SKIPPED {count} {tests}: {reason}', yellow=True)


def _with_database(url, name):
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path='/' + name))


@pytest.fixture(scope='session', params=['sqlite', 'postgres', 'mysql'])
def engine(request):
    """The engine name, and for a server a fresh database made for this run (dropped after)."""
    if request.param == 'sqlite':
        yield 'sqlite', None
        return
    variable = SERVER_ENGINES[request.param]
    admin_url = os.environ.get(variable)
    if not admin_url:
        pytest.skip(f'{variable} is not set: no {request.param} server to test against')
    name = f'personapi_test_{uuid.uuid4().hex[:12]}'
    admin = db_url.connect(admin_url)
    admin.execute_sql(f'CREATE DATABASE {name}')
    try:
        yield request.param, _with_database(admin_url, name)
    finally:
        if isinstance(admin, peewee.PostgresqlDatabase):
            admin.execute_sql(f'DROP DATABASE {name} WITH (FORCE)')
        else:
            admin.execute_sql(f'DROP DATABASE {name}')
        admin.close()


@pytest.fixture
def database_url(engine, tmp_path):
    """A URL to an empty, ready schema; the models are bound to it."""
    name, server_url = engine
    url = server_url or f'sqlite:///{tmp_path}/persons.db'
    models.connect(url)
    if server_url:
        models.db.drop_tables(models.MODELS, safe=True)
    models.migrate()
    yield url
    models.db.close()


@pytest.fixture
def smtp():
    sink = SmtpSink().start()
    yield sink
    sink.stop()


@pytest.fixture
def config(database_url, smtp):
    return Config(database_url=database_url, smtp_host='127.0.0.1', smtp_port=smtp.port,
                  smtp_timeout=5, mail_max_backoff=1, rate_limit='off')


@pytest.fixture
def courier(config):
    """A courier that is not started: tests deliver with `courier.deliver_due()`."""
    return mailer.Courier.from_config(config)


@pytest.fixture
def client(config, courier):
    return webtest.TestApp(personapi.create_app(config, courier))


@pytest.fixture
def service_env(database_url, smtp):
    """Environment for a gunicorn service on this test's database and SMTP sink."""
    models.db.close()  # the service's processes open their own connections
    return {'DATABASE_URL': database_url, 'SMTP_HOST': '127.0.0.1', 'SMTP_PORT': str(smtp.port),
            'MAIL_MAX_BACKOFF': '1', 'RATE_LIMIT': 'off'}


@pytest.fixture
def service(service_env, tmp_path):
    """A running gunicorn service on this test's database and SMTP sink."""
    running = Service(service_env, log_path=tmp_path / 'gunicorn.log').start()
    yield running
    running.kill()

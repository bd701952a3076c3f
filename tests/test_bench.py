"""The benchmark: its ceilings' gunicorn settings (as it ships, and the service's), a mail
ceiling whose mail is real on every engine, its instruction counts and its targets."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from gunicorn.app.base import Application
from gunicorn.config import KNOWN_SETTINGS

from bench import common, instructions, run
from support import SmtpSink, http, one_engine

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
STOCK = settings('bench/gunicorn_stock.conf.py')
HOOKS = {setting.name for setting in KNOWN_SETTINGS if setting.section == 'Server Hooks'}
SETTINGS = sorted(setting.name for setting in KNOWN_SETTINGS
                  if setting.name not in HOOKS and setting.name != 'wsgi_app')


@pytest.mark.parametrize('name', SETTINGS)
def test_the_ceilings_run_under_every_setting_of_the_service(name):
    assert CEILING.get(name) == SERVICE.get(name)


def test_the_ceilings_keep_none_of_the_services_hooks():
    for ceiling in (CEILING, STOCK):
        assert {name for name in HOOKS if name in ceiling} == {'post_worker_init'}
        assert ceiling['post_worker_init'] is not SERVICE['post_worker_init']


SERVING = {'workers', 'threads', 'keepalive'}


@pytest.mark.parametrize('name', SETTINGS)
def test_the_stock_ceilings_run_on_gunicorn_as_it_ships_but_for_how_many_serve(name):
    """Stock gthread, no access log, no logger class: only the service's processes,
    threads and keep-alive (and SO_REUSEPORT, which only spreads connections evenly)."""
    if name in SERVING | {'reuse_port', 'control_socket_disable'}:
        assert STOCK[name] == SERVICE[name]
    elif name == 'worker_class':
        assert STOCK[name] == 'gthread'
    else:
        assert name not in STOCK  # gunicorn's default


@pytest.fixture
def mail_ceiling(database_url):
    """The mail ceiling on gunicorn as it ships, over the engine's own driver."""
    common.WORK.mkdir(exist_ok=True)
    sink = SmtpSink().start()
    try:
        with run.serve(run.MAIL, database_url, sink.port, [], 'test-mail') as server:
            yield database_url, sink, f'http://127.0.0.1:{server.port}'
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
    assert run.scalar(database, 'SELECT count(*) FROM outbox') == 0


SEEDED = 45  # persons: more than a page, so that pages make their next cursor too


@pytest.fixture(scope='module')
def seeded(tmp_path_factory):
    database = tmp_path_factory.mktemp('instructions') / 'persons.db'
    common.seed(database, SEEDED)
    return database


@pytest.mark.parametrize('kind', instructions.REQUESTS)
@pytest.mark.parametrize('app_spec', instructions.APPS.values())
@one_engine
def test_each_counted_app_answers_every_request_it_is_counted_on(engine, seeded, app_spec,
                                                                 kind):
    answered = subprocess.run(
        [sys.executable, 'bench/instructions.py', '--answer', app_spec, kind, '50', str(SEEDED)],
        cwd=ROOT,
        env={**os.environ, 'PYTHONPATH': str(ROOT), 'DATABASE_URL': f'sqlite:///{seeded}'},
        capture_output=True, text=True)
    assert answered.returncode == 0, answered.stderr[-2000:]


@one_engine
@pytest.mark.skipif(not shutil.which('valgrind'), reason='valgrind is not installed')
def test_instructions_are_counted_per_request_and_the_service_costs_more(engine, seeded):
    counts = instructions.measure(seeded, SEEDED, few=10, many=40)
    assert 0 < counts['bare ceiling'] < counts['personapi']
    assert instructions.report(counts)[0].endswith('| 1.00× |')


def result(scenario, service_ratio, p99=(10.0, 20.0)):
    """A scenario's Result with the service at `service_ratio` of its baseline."""
    rows = {scenario.baseline.name: {'rps': 1000.0, 'p99': p99[1]},
            run.SERVICE.name: {'rps': 1000.0 * service_ratio, 'p99': p99[0], 'non2xx': 0,
                               'socket': 0, 'locked': 0, 'rss': 50}}
    return run.Result(scenario, rows, {run.SERVICE.name: [service_ratio]})


SCENARIOS = {scenario.key: scenario for scenario in run.scenarios(1000)}


@pytest.mark.parametrize('key, target', [('get', 0.85), ('post', 0.80), ('get-postgresql', 0.85),
                                         ('post-postgresql', 0.75), ('get-mysql', 0.85),
                                         ('post-mysql', 0.75), ('list', 0.80)])
def test_each_engines_targets_are_checked_against_the_stock_ceiling(key, target):
    scenario = SCENARIOS[key]
    assert scenario.baseline in (run.BARE, run.MAIL) and scenario.same_config is not None
    for ratio, verdict in ((target - 0.01, '**MISSED**'), (target, 'met')):
        (line, *_) = run.targets([result(scenario, ratio)])
        assert line.startswith(f'- {verdict}: {scenario.title} ≥ {target:.2f}×')
    if scenario.p99:
        lines = run.targets([result(scenario, 1.0, p99=(30.0, 20.0))])
        assert any(line.startswith('- **MISSED**') and 'p99' in line for line in lines)


def test_the_idle_scenario_is_met_only_when_every_get_is_answered_within_a_second():
    scenario = SCENARIOS['idle']
    for within, verdict in ((9, '**MISSED**'), (10, 'met')):
        row = {'probes': 10, 'within_1s': within, 'max_ms': 1500.0}
        (line,) = [line for line in run.targets([run.Result(scenario, {run.SERVICE.name: row},
                                                                {})]) if 'idle' in line]
        assert line.startswith(f'- {verdict}: ')


@pytest.mark.parametrize('last_p50, verdict', [(15.0, 'met'), (15.1, '**MISSED**')])
def test_the_last_page_of_the_large_table_is_held_to_1_5_times_the_first(last_p50, verdict):
    def page(key, p50):
        rows = {run.BARE.name: {'rps': 1000.0},
                run.SERVICE.name: {'rps': 900.0, 'p50': p50, 'cpu': 0.3, 'non2xx': 0, 'socket': 0,
                                   'locked': 0, 'rss': 50}}
        return run.Result(SCENARIOS[key], rows, {run.SERVICE.name: [0.9]})

    lines = run.targets([page('list-1m-first', 10.0), page('list-1m-end', last_p50)])
    (line,) = [line for line in lines if 'last page' in line]
    assert line.startswith(f'- {verdict}: the last page of 1,000 persons ≤ 1.5× the first')

"""`make bench`: the service as shipped against the ceilings of bench/ceiling.py on gunicorn
as it ships (bench/gunicorn_stock.conf.py), and under the service's own settings
(bench/gunicorn_ceiling.conf.py, "same-config"), with wrk, on SQLite, PostgreSQL and MariaDB;
and a new client among 5,000 idle connections.

Each scenario serves its apps in turn, round after round, every other round in reverse
order (A B C C B A: the machine is noisy, and a place in the order is worth up to 15%),
each on a fresh copy of a database seeded by a bulk insert, with a real SMTP sink, and reports
every figure of the apps listed after the scenario's baseline as a ratio to the baseline of
the same round. Prints the tables and writes them into bench/RESULTS.md between its markers
(the notes around them are kept), and draws bench/results.png.

    python bench/run.py                      # the whole run, as `make bench`
    python bench/run.py --quick              # a few seconds per scenario: a smoke test only
    python bench/run.py --only get --no-results --gunicorn-args='--worker-class sync'
    python bench/run.py --profile            # py-spy on the service's workers instead
    python bench/run.py --profile mail --only post  # ... or on a ceiling's

A scenario is one entry of scenarios(): its load, its engine, its apps (an App is a
settings file, an optional application and extra environment), the one the others are
compared with, and the service's target against it. On PostgreSQL and MariaDB the bench
makes a database of its own (BENCH_DATABASE) on the servers BENCH_POSTGRES_URL and
BENCH_MYSQL_URL name, and drops it at the end; a server that does not answer skips its
scenarios, said so in the report.
"""

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import platform
import random
import re
import resource
import runpy
import shlex
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from aiosmtpd.controller import Controller

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import idle  # noqa: E402  (the line above lets this file run as a script)
from bench.common import (BENCH, PAGE, ROOT, SEED_PERSONS, WORK, free_port,  # noqa: E402
                          page_paths, seed, seed_rows, wait_ready, workers_of)

RESULTS = BENCH / 'RESULTS.md'
CHART = BENCH / 'results.png'
BIN = Path(sys.executable).parent
BEGIN, END = '<!-- bench:begin -->', '<!-- bench:end -->'
WRK_THREADS = 2
LIST_PERSONS = 100_000  # the table the list scenario pages through
LIST_PAGES = 10_000  # pages a list run asks for at random, their cursors made beforehand
RATE_LIMIT = '1000000/second'
SERVERS = {'postgresql': os.environ.get('BENCH_POSTGRES_URL',
                                        'postgresql://postgres@127.0.0.1:5432/test'),
           'mysql': os.environ.get('BENCH_MYSQL_URL', 'mysql://root@127.0.0.1:3306/test')}
BENCH_DATABASE = 'personapi_bench'
ENGINE_NAMES = {'sqlite': 'SQLite', 'postgresql': 'PostgreSQL', 'mysql': 'MariaDB'}
STOCK_CONF, SAME_CONF = 'bench/gunicorn_stock.conf.py', 'bench/gunicorn_ceiling.conf.py'


@dataclasses.dataclass(frozen=True)
class App:
    key: str
    name: str
    conf: str  # gunicorn settings file
    wsgi: str = ''  # the application, when not the settings file's
    mails: bool = False  # whether it sends welcome mail
    signs_cursors: bool = False  # its list's cursors: the service's own, or the bare id
    env: tuple = ()  # (name, value) pairs added to its environment


BARE = App('bare', 'bare ceiling', STOCK_CONF)
MAIL = App('mail', 'mail ceiling', STOCK_CONF, 'bench.ceiling:mail_app', mails=True)
SAME_BARE = App('same-bare', 'bare ceiling, same-config', SAME_CONF)
SAME_MAIL = App('same-mail', 'mail ceiling, same-config', SAME_CONF, 'bench.ceiling:mail_app',
                mails=True)
SERVICE = App('service', 'personapi', 'gunicorn.conf.py', mails=True, signs_cursors=True)
NO_METRICS = App('no-metrics', 'personapi, METRICS=off', 'gunicorn.conf.py', mails=True,
                 signs_cursors=True, env=(('METRICS', 'off'),))
APPS = {app.key: app for app in (BARE, MAIL, SAME_BARE, SAME_MAIL, SERVICE, NO_METRICS)}


@dataclasses.dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    mode: str  # 'get', 'post', 'list' (wrk's load) or 'idle' (bench/idle.py)
    connections: int
    persons: int
    apps: tuple  # served in this order in each round
    baseline: App  # the apps after it in `apps` are reported as a ratio to it
    target: float = 0.0  # the service's req/s at least this share of the baseline's
    p99: bool = False  # the service's p99 no worse than the baseline's
    same_config: App = None  # the service's ratio to it is reported too
    engine: str = 'sqlite'  # or 'postgresql', 'mysql'
    smtp_delay: float = 0.0
    await_mail: bool = False  # after the load, wait until every mail is delivered
    pages: str = 'random'  # the list's pages: at 'random', the 'first' or the last ('end')


GET, POST = 'GET /person/{id}', 'POST /person, mail delivered'


def scenarios(large):
    engines = [Scenario(f'get-{engine}', f'{GET}, {name}', 'get', 32, SEED_PERSONS,
                        (BARE, SAME_BARE, SERVICE), BARE, 0.85, engine=engine,
                        same_config=SAME_BARE)
               for engine, name in ENGINE_NAMES.items() if engine != 'sqlite']
    engines += [Scenario(f'post-{engine}', f'{POST}, {name}', 'post', 16, SEED_PERSONS,
                         (MAIL, SAME_MAIL, SERVICE), MAIL, 0.75, p99=True, engine=engine,
                         same_config=SAME_MAIL, await_mail=True)
                for engine, name in ENGINE_NAMES.items() if engine != 'sqlite']
    return [Scenario('get', GET, 'get', 32, SEED_PERSONS, (BARE, SAME_BARE, SERVICE), BARE, 0.85,
                     same_config=SAME_BARE),
            Scenario('post', POST, 'post', 16, SEED_PERSONS, (MAIL, SAME_MAIL, SERVICE), MAIL,
                     0.80, p99=True, same_config=SAME_MAIL, await_mail=True),
            Scenario('post-slow-smtp', 'POST, SMTP 200 ms', 'post', 16, SEED_PERSONS,
                     (MAIL, SERVICE), MAIL, p99=True, smtp_delay=0.2),
            Scenario('get-1m', f'GET /person/{{id}}, {large:,} persons', 'get', 32, large,
                     (BARE, SERVICE), BARE),
            Scenario('list', f'GET /person, pages of {PAGE} at random, {LIST_PERSONS:,} persons',
                     'list', 32, LIST_PERSONS, (BARE, SAME_BARE, SERVICE), BARE, 0.80,
                     same_config=SAME_BARE),
            Scenario('list-1m-first', f'GET /person, first page, {large:,} persons', 'list', 32,
                     large, (BARE, SERVICE), BARE, pages='first'),
            Scenario('list-1m-end', f'GET /person, last page, {large:,} persons', 'list', 32,
                     large, (BARE, SERVICE), BARE, pages='end'),
            Scenario('get-metrics', 'GET, metrics on against off', 'get', 32, SEED_PERSONS,
                     (NO_METRICS, SERVICE), NO_METRICS, 0.95),
            Scenario('post-metrics', 'POST, metrics on against off', 'post', 16, SEED_PERSONS,
                     (NO_METRICS, SERVICE), NO_METRICS, 0.95, await_mail=True),
            *engines,
            Scenario('idle', f'a new client among {idle.IDLE:,} idle connections', 'idle',
                     idle.IDLE, SEED_PERSONS, (BARE, SERVICE), BARE)]


# --- Database -------------------------------------------------------------------------------

def fresh_copy(template):
    target = WORK / 'run.db'
    for suffix in ('', '-wal', '-shm'):
        Path(f'{target}{suffix}').unlink(missing_ok=True)
    shutil.copyfile(template, target)
    # Written out now: the kernel flushing a large copy would weigh on the first app's run.
    with open(target, 'rb+') as copy:
        os.fsync(copy.fileno())
    return f'sqlite:///{target}'


def with_database(url, name):
    scheme, rest = url.split('://', 1)
    return f'{scheme}://{rest.rsplit("/", 1)[0]}/{name}'


def admin(engine):
    from playhouse import db_url

    return db_url.connect(SERVERS[engine])


@contextlib.contextmanager
def server_database(engine, persons):
    """The bench's own database on the engine's server, with the service's schema and
    `persons` rows; dropped at the end. Only this database is ever touched."""
    import models

    server = admin(engine)
    server.execute_sql(f'DROP DATABASE IF EXISTS {BENCH_DATABASE}')
    server.execute_sql(f'CREATE DATABASE {BENCH_DATABASE}')
    url = with_database(SERVERS[engine], BENCH_DATABASE)
    try:
        models.connect(url)
        models.migrate()
        with models.db.atomic():
            models.db.execute_sql(  # one statement: a bulk insert over the network
                'INSERT INTO person (id, first_name, last_name, email, email_key) VALUES '
                + ', '.join(['(%s, %s, %s, %s, %s)'] * persons),
                [value for row in seed_rows(persons) for value in row])
        if engine == 'postgresql':  # ids after the seeded ones
            models.db.execute_sql("SELECT setval('person_id_seq', %s)", (persons,))
        models.db.close()
        yield url
    finally:
        models.db.close()
        server.execute_sql(f'DROP DATABASE IF EXISTS {BENCH_DATABASE}'
                           + (' WITH (FORCE)' if engine == 'postgresql' else ''))
        server.close()


def reset(url, persons):
    """The server database as seeded: what a run added is deleted."""
    from playhouse import db_url

    database = db_url.connect(url)
    with database.atomic():
        for table in ('outbox', 'idempotencykey'):
            database.execute_sql(f'DELETE FROM {table}')
        database.execute_sql('DELETE FROM person WHERE id > %s', (persons,))
    database.close()
    return url


def scalar(url, sql):
    if url.startswith('sqlite:'):
        with contextlib.closing(sqlite3.connect(url.removeprefix('sqlite:///'),
                                                timeout=15)) as connection:
            return connection.execute(sql).fetchone()[0]
    from playhouse import db_url

    database = db_url.connect(url)
    try:
        return database.execute_sql(sql).fetchone()[0]
    finally:
        database.close()


def server_answers(engine):
    try:
        admin(engine).close()
    except Exception as error:  # noqa: BLE001  (any reason makes the engine's scenarios skip)
        print(f'{ENGINE_NAMES[engine]} at {SERVERS[engine]} does not answer '
              f'({type(error).__name__}): its scenarios are skipped', flush=True)
        return False
    return True


# --- SMTP sink ------------------------------------------------------------------------------

class Sink:
    """Accepts every mail and discards it, after `delay` seconds in DATA; keeps each
    recipient, so a mail sent twice counts once."""

    def __init__(self):
        self.port, self.delay, self.recipients = 0, 0.0, set()

    def reset(self, delay):
        self.delay, self.recipients = delay, set()

    async def handle_DATA(self, server, session, envelope):
        if self.delay:
            await asyncio.sleep(self.delay)
        self.recipients.update(envelope.rcpt_tos)
        return '250 OK'


# --- Servers --------------------------------------------------------------------------------

def cpu_seconds(pids):
    """User and system CPU time the processes have used so far."""
    ticks = 0
    for pid in pids:
        fields = Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime and stime, fields 14 and 15
    return ticks / os.sysconf('SC_CLK_TCK')


def machine_busy_seconds():
    """CPU time all processes of the machine have used so far (/proc/stat, minus idle)."""
    user, nice, system, idle, iowait, *rest = map(int, open('/proc/stat').readline().split()[1:])
    return (user + nice + system + sum(rest[:3])) / os.sysconf('SC_CLK_TCK')


def rss_mb(pid):
    for line in Path(f'/proc/{pid}/status').read_text().splitlines():
        if line.startswith('VmRSS:'):
            return int(line.split()[1]) / 1024
    return 0.0


@dataclasses.dataclass
class Server:
    port: int
    process: subprocess.Popen
    log: Path


@contextlib.contextmanager
def serve(app, database_url, sink_port, gunicorn_args, label):
    """gunicorn with `app`'s settings on a free loopback port; stopped whatever happens."""
    port, log = free_port(), WORK / f'{label}.log'
    # wrk is one address standing for many clients: the write limit stays on (its cost is
    # measured) but high enough never to refuse.
    env = {**os.environ, 'DATABASE_URL': database_url, 'RATE_LIMIT': RATE_LIMIT,
           'SMTP_HOST': '127.0.0.1', 'SMTP_PORT': str(sink_port), **dict(app.env)}
    command = [str(BIN / 'gunicorn'), '-c', app.conf, '--bind', f'127.0.0.1:{port}',
               *gunicorn_args, *([app.wsgi] if app.wsgi else [])]
    with open(log, 'w') as output:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=output,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(port, process, log)
    try:
        wait_ready(process, port, log)
        yield server
    finally:
        stop(process)


def stop(process):
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # its own session: only what it started
        process.wait()


# --- Load -----------------------------------------------------------------------------------

def list_paths(app, scenario, databases):
    """A file of the pages `scenario` has wrk ask `app` for, one path a line: full pages
    after random ids (the same for every app), the first page, or the last full page."""
    if scenario.pages == 'first':
        after = [None]
    elif scenario.pages == 'end':
        after = [scenario.persons - PAGE]
    else:
        pick = random.Random(scenario.persons)
        after = [pick.randrange(scenario.persons - PAGE + 1) for _ in range(LIST_PAGES)]
    path = WORK / f'pages-{app.key}.txt'
    path.write_text('\n'.join(page_paths(after, app.signs_cursors,
                                         databases[scenario.persons])) + '\n')
    return path


def wrk(server, scenario, seconds, tag, paths=None):
    env = {**os.environ, 'BENCH_MODE': scenario.mode, 'BENCH_PERSONS': str(scenario.persons),
           'BENCH_TAG': tag, 'BENCH_PATHS': str(paths or '')}
    command = ['wrk', f'-t{WRK_THREADS}', f'-c{scenario.connections}', f'-d{seconds}s',
               '--timeout', '10s', '-s', str(BENCH / 'wrk.lua'), f'http://127.0.0.1:{server.port}']
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True,
                          timeout=seconds + 60)
    return json.loads([line for line in done.stdout.splitlines() if line.startswith('{')][-1])


def persons_created(database_url):
    return scalar(database_url, 'SELECT count(*) FROM person') - SEED_PERSONS


def wrk_seconds():
    """CPU time of the finished wrk runs (this process's waited-for children)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wait_for_mail(sink, database, seconds):
    """Seconds until the sink holds a mail per person created, or None past `seconds`."""
    start = time.monotonic()
    while len(sink.recipients) < persons_created(database):
        if time.monotonic() - start > seconds:
            return None
        time.sleep(0.1)
    return time.monotonic() - start


def database_for(scenario, databases):
    """A database as seeded for one run: a fresh copy of SQLite's, a server's reset."""
    if scenario.engine == 'sqlite':
        return fresh_copy(databases[scenario.persons])
    return reset(databases[scenario.engine], scenario.persons)


def measure(app, scenario, databases, sink, args, label):
    """One run of `app` on `scenario`: warm-up, measured wrk run, memory, mail."""
    paths = list_paths(app, scenario, databases) if scenario.mode == 'list' else None
    database = database_for(scenario, databases)
    sink.reset(scenario.smtp_delay)
    with serve(app, database, sink.port, args.gunicorn_args, label) as server:
        wrk(server, scenario, args.warmup, f'{label}w', paths)
        workers = workers_of(server.process.pid)
        ours = [*workers, server.process.pid, os.getpid()]  # the sink runs in this process
        before = cpu_seconds(workers), cpu_seconds(ours), machine_busy_seconds(), wrk_seconds()
        run = wrk(server, scenario, args.seconds, label, paths)
        after = cpu_seconds(workers), cpu_seconds(ours), machine_busy_seconds(), wrk_seconds()
        served, ours_, busy, load = (end - start for start, end in zip(before, after))
        run['cpu_ms'] = 1000 * served / max(run['requests'], 1)
        # What other programs took from the cores meanwhile: the noise these figures carry.
        run['others_pct'] = 100 * max(0.0, busy - ours_ - load) / args.seconds / os.cpu_count()
        run['rss_mb'] = max(rss_mb(pid) for pid in workers)
        if scenario.mode == 'post' and app.mails:
            run['mails_at_end'] = len(sink.recipients)
            if scenario.await_mail:
                run['drain_s'] = wait_for_mail(sink, database, args.drain)
            run['mails'] = len(sink.recipients)
            # Counted last: requests in flight when wrk stopped still commit.
            run['created'] = persons_created(database)
    run['locked'] = server.log.read_text(errors='replace').count('database is locked')
    run['rps'] = run['requests'] / (run['duration_us'] / 1e6)
    return run


def measure_idle(app, scenario, databases, sink, args, label):
    """One run of `app` with scenario.connections idle connections and a new client's GETs
    (bench/idle.py)."""
    with serve(app, database_for(scenario, databases), sink.port, args.gunicorn_args,
               label) as server:
        run = idle.run(server.port, scenario.connections, 3 if args.quick else idle.PROBES)
        run['rss_mb'] = max(rss_mb(pid) for pid in workers_of(server.process.pid))
    return run


MEASURES = {'get': measure, 'post': measure, 'list': measure,  # by Scenario.mode
            'idle': measure_idle}


# --- Report ---------------------------------------------------------------------------------

@dataclasses.dataclass
class Result:
    scenario: Scenario
    rows: dict  # app name -> summarise() of its rounds
    ratios: dict  # app name -> its req/s over the baseline's, per round (apps after the baseline)
    same_config: list = None  # the service's req/s over the same-config ceiling's, per round


def summarise(runs):
    """The mean of the rounds' figures, the worst of the errors and memory."""
    if 'probes' in runs[0]:  # the idle scenario: the worst round
        return min(runs, key=lambda run: (run['within_1s'], -(run['max_ms'] or math.inf)))
    ms = lambda key: statistics.mean(run[key] for run in runs) / 1000  # noqa: E731
    row = {'rps': statistics.mean(run['rps'] for run in runs), 'p50': ms('p50_us'),
           'p99': ms('p99_us'), 'cpu': statistics.mean(run['cpu_ms'] for run in runs),
           'others': statistics.mean(run['others_pct'] for run in runs),
           'non2xx': sum(run['status_errors'] for run in runs),
           'socket': sum(run['socket_errors'] for run in runs),
           'locked': sum(run['locked'] for run in runs),
           'rss': max(run['rss_mb'] for run in runs)}
    if 'mails' in runs[0]:
        row['created'] = sum(run['created'] for run in runs)
        row['mails'] = sum(run['mails'] for run in runs)
        row['mails_at_end'] = sum(run['mails_at_end'] for run in runs)
        if 'drain_s' in runs[0]:
            drains = [run['drain_s'] for run in runs]
            row['drain'] = None if None in drains else max(drains)
    return row


def ratio_text(result, name):
    ratios = result.ratios.get(name)
    return f'{statistics.mean(ratios):.2f}' if ratios else ''


def instruction_counts(template):
    """The cost of a GET and of a page, counted in instructions (bench/instructions.py): the
    same at every run, where req/s moves with the machine's load."""
    if template is None:
        return []
    if not shutil.which('valgrind'):
        return ['### Instructions (callgrind)', '', 'Not counted: valgrind is not installed.']
    from bench import instructions

    lines = []
    for kind, title in instructions.REQUESTS.items():
        header = [f'| app | instructions per {title} | against the first |', '|---|---:|---:|']
        lines += [f'### Instructions per {title} (callgrind)', '',
                  'A whole gunicorn worker (1 process, its threads, GETs on 4 kept-alive '
                  'connections), the service as shipped against the bare ceiling on gunicorn as '
                  'it ships:', '', *header, *instructions.report(
                      instructions.measure_workers(template, SEED_PERSONS, kind=kind)), '',
                  'In-process, the app alone (no gunicorn):', '', *header,
                  *instructions.report(instructions.measure(template, SEED_PERSONS, kind=kind)),
                  '']
    return lines[:-1]


def loads(results):
    return [result for result in results if result.scenario.mode != 'idle']


def same_config_text(result):
    return f'{statistics.mean(result.same_config):.2f}' if result.same_config else ''


def headline(results):
    """The apps by scenario, req/s, each compared with its scenario's baseline (and the
    service with the same-config ceiling too)."""
    results = loads(results)
    apps = list(dict.fromkeys(app for result in results for app in result.scenario.apps))
    lines = ['| | ' + ' | '.join(result.scenario.title for result in results) + ' |',
             '|---|' + '---:|' * len(results)]
    for app in apps:
        cells = []
        for result in results:
            row, ratio = result.rows.get(app.name), ratio_text(result, app.name)
            cell = '—' if row is None else f'{row["rps"]:,.0f}'
            if ratio:
                cell += f' ({ratio}× {result.scenario.baseline.name}'
                if app == SERVICE and result.same_config:
                    cell += f'; {same_config_text(result)}× same-config'
                cell += ')'
            cells.append(f'**{cell}**' if app == SERVICE else cell)
        name = f'**{app.name}**' if app == SERVICE else app.name
        lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
    return lines


def mail_text(row):
    if 'mails' not in row:
        return '–'
    if 'drain' not in row:
        return f'{row["mails_at_end"]} when the load ended, of {row["created"]} (not waited for)'
    drain = 'not all within the wait' if row['drain'] is None \
        else f'all {row["drain"]:.1f} s after the load'
    return f'{row["mails"]} / {row["created"]} ({row["mails_at_end"]} when the load ended; {drain})'


def table(results):
    lines = ['| scenario | app | req/s | ratio to the baseline (per round) | p50 ms | p99 ms '
             '| workers\' CPU ms per request | non-2xx | socket errors | "locked" '
             '| mails / persons created | max RSS per worker MB | other programs\' CPU % |',
             '|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|']
    for result in loads(results):
        for name, row in result.rows.items():
            ratios = result.ratios.get(name)
            ratio = (f'**{statistics.mean(ratios):.2f}** ({", ".join(f"{r:.2f}" for r in ratios)})'
                     if ratios else '1' if name == result.scenario.baseline.name else '')
            lines.append(f'| {result.scenario.title} | {name} | {row["rps"]:.0f} | {ratio} '
                         f'| {row["p50"]:.1f} | {row["p99"]:.1f} | {row["cpu"]:.2f} '
                         f'| {row["non2xx"]} | {row["socket"]} | {row["locked"]} '
                         f'| {mail_text(row)} | {row["rss"]:.0f} | {row["others"]:.0f} |')
    return lines


def idle_table(results):
    """The idle scenario's figures: did a new client get in?"""
    lines = []
    for result in (result for result in results if result.scenario.mode == 'idle'):
        lines += [f'### {result.scenario.title[0].upper()}{result.scenario.title[1:]}', '',
                  f'{result.scenario.connections:,} connections that send nothing, each opened '
                  'again as soon as the server closes it; meanwhile GETs, each on a new '
                  f'connection, {idle.PROBE_EVERY:.0f} s apart, waited for '
                  f'{idle.PROBE_TIMEOUT:.0f} s at most (the worst round):', '',
                  '| app | idle connections open before the GETs / at the end | connections '
                  'opened in all | GETs answered | within 1 s | p50 ms | max ms | max RSS per '
                  'worker MB |', '|---|---:|---:|---:|---:|---:|---:|---:|']
        for name, row in result.rows.items():
            ms = lambda key: '–' if row[key] is None else f'{row[key]:.0f}'  # noqa: E731
            lines.append(f'| {name} | {row["filled"]:,} / {row["held"]:,} | {row["opened"]:,} '
                         f'| {row["answered"]} of {row["probes"]} | {row["within_1s"]} '
                         f'| {ms("p50_ms")} | {ms("max_ms")} | {row["rss_mb"]:.0f} |')
        lines.append('')
    return lines


def targets(results):
    """The targets, each with its measured figure and whether it is met."""
    by_key = {result.scenario.key: result for result in results}
    checks = []

    def check(label, met, figure):
        checks.append(f'- {"met" if met else "**MISSED**"}: {label}: {figure}')

    def service(key):
        return by_key[key].rows[SERVICE.name]

    for result in results:
        scenario = result.scenario
        if scenario.target:
            ratio = statistics.mean(result.ratios[SERVICE.name])
            check(f'{scenario.title} ≥ {scenario.target:.2f}× the {scenario.baseline.name}',
                  ratio >= scenario.target, f'{ratio:.2f}')
        if scenario.p99:
            mine, ceiling = service(scenario.key)['p99'], result.rows[scenario.baseline.name]['p99']
            check(f'{scenario.title}: p99 ≤ the {scenario.baseline.name}\'s', mine <= ceiling,
                  f'{mine:.1f} ms vs {ceiling:.1f} ms')
        if scenario.mode == 'idle':
            row = service(scenario.key)
            check(f'{scenario.title}: every GET answered within 1 s',
                  row['within_1s'] == row['probes'],
                  f'{row["within_1s"]} of {row["probes"]} (max {row["max_ms"] or math.inf:.0f} ms)')
    if 'post' in by_key and 'post-slow-smtp' in by_key:
        share = service('post-slow-smtp')['rps'] / service('post')['rps']
        check('POST with a 200 ms SMTP server ≥ 0.90 of POST', share >= 0.90, f'{share:.2f}')
    if 'list-1m-first' in by_key and 'list-1m-end' in by_key:
        first, end = service('list-1m-first'), service('list-1m-end')
        check(f'the last page of {by_key["list-1m-end"].scenario.persons:,} persons ≤ 1.5× the '
              'first page\'s time (p50)', end['p50'] <= 1.5 * first['p50'],
              f'{end["p50"]:.1f} ms vs {first["p50"]:.1f} ms ({end["p50"] / first["p50"]:.2f}×; '
              f'workers\' CPU per page {end["cpu"]:.2f} vs {first["cpu"]:.2f} ms)')
    if 'get' in by_key and 'get-1m' in by_key:
        small, large = service('get')['p99'], service('get-1m')['p99']
        check('GET p99 at the large database ≤ 1.5× the 10k one', large <= 1.5 * small,
              f'{large:.1f} ms vs {small:.1f} ms ({large / small:.2f}×)')
    rows = [(result.scenario, name, row) for result in loads(results)
            for name, row in result.rows.items()]
    errors = sum(row['non2xx'] + row['socket'] + row['locked']
                 for _, name, row in rows if name == SERVICE.name)
    check('zero non-2xx, socket errors and "database is locked"', errors == 0, str(errors))
    unsent = [f'{scenario.title}, {name}: {row["mails"]} of {row["created"]}'
              for scenario, name, row in rows if scenario.await_mail and 'mails' in row
              and (row['mails'] != row['created'] or row['drain'] is None)]
    check('every mail delivered where awaited, by every app', not unsent,
          ', '.join(unsent) or 'all')
    rss = max((row['rss'] for _, name, row in rows if name == SERVICE.name), default=0)
    check('RSS per worker < 60 MB under load', rss < 60, f'{rss:.0f} MB')
    return checks


def server_versions(engines):
    versions = []
    for engine in engines:
        server = admin(engine)
        versions.append(f'{ENGINE_NAMES[engine]} '
                        f'{server.execute_sql("SELECT version()").fetchone()[0].split(" on ")[0]}')
        server.close()
    return ''.join(f', {version}' for version in versions)


def environment(args, engines):
    settings = runpy.run_path(str(ROOT / 'gunicorn.conf.py'))
    stock = runpy.run_path(str(ROOT / STOCK_CONF))
    versions = ', '.join(f'{name} {importlib.metadata.version(name)}'
                         for name in ('falcon', 'peewee', 'gunicorn', 'email-validator'))
    wrk_version = subprocess.run(['wrk', '-v'], capture_output=True, text=True).stdout.split()[1]
    cpu = next((line.split(':', 1)[1].strip() for line in open('/proc/cpuinfo')
                if line.startswith('model name')), platform.machine())
    flags = ' '.join(args.gunicorn_args) or 'none'
    worker_class = settings['worker_class']
    return [f'- Date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}',
            f'- Machine: {os.cpu_count()} cores ({cpu}), Linux {platform.release()}; '
            f'wrk ({WRK_THREADS} threads) shares the cores with the server',
            f'- Versions: Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}'
            f'{server_versions(engines)}, {versions}, wrk {wrk_version}',
            f'- The service and the same-config ceilings: gunicorn.conf.py, '
            f'{getattr(worker_class, "__name__", worker_class)}, {settings["workers"]} workers, '
            f'{settings["threads"]} threads, keepalive {settings["keepalive"]} s, '
            f'worker_connections {settings["worker_connections"]:,}, access log; the ceilings: '
            f'{STOCK_CONF}, gunicorn as it ships ({stock["worker_class"]}, '
            f'{stock["workers"]} workers, {stock["threads"]} threads, keepalive '
            f'{stock["keepalive"]} s, worker_connections 1,000, no access log); extra flags '
            f'for all: {flags}',
            '- The ceilings: a connection per thread over the engine\'s own driver (sqlite3, '
            'psycopg2, PyMySQL); the service: peewee, its connection pool on a server',
            f'- Method: {args.rounds} round(s) of each scenario\'s apps in turn, every other '
            f'round in reverse order (A B C C B A), '
            f'{args.warmup} s warm-up then {args.seconds} s measured; req/s, p50 and p99 are '
            f'the rounds\' mean; wrk counts status ≥ 400 as non-2xx (no app answers 1xx or '
            f'3xx); "mail delivered": mails waited for {args.drain} s at most after the load, '
            f'req/s counts the load alone; RATE_LIMIT={RATE_LIMIT} (on, never refusing)']


def write_results(lines):
    text = RESULTS.read_text() if RESULTS.exists() else f'# Benchmark results\n\n{BEGIN}\n{END}\n'
    head, rest = text.split(BEGIN, 1)
    RESULTS.write_text(f'{head}{BEGIN}\n' + '\n'.join(lines) + f'\n{END}{rest.split(END, 1)[1]}')


def draw(results, path, subtitle):
    """Req/s per scenario, one bar per app, the ratio to the baseline above the others."""
    import matplotlib

    matplotlib.use('Agg')
    from matplotlib import pyplot

    results = loads(results)
    apps = list(dict.fromkeys(app for result in results for app in result.scenario.apps))
    width = 0.8 / len(apps)
    figure, axes = pyplot.subplots(figsize=(2.2 * len(results) + 2, 5.5), layout='constrained')
    for index, app in enumerate(apps):
        places = [n + (index - (len(apps) - 1) / 2) * width
                  for n, result in enumerate(results) if app.name in result.rows]
        ran = [result for result in results if app.name in result.rows]
        bars = axes.bar(places, [result.rows[app.name]['rps'] for result in ran], width,
                        label=app.name)
        axes.bar_label(bars, [f'{result.rows[app.name]["rps"]:,.0f}'
                              + (f'\n{ratio_text(result, app.name)}×' if app.name in result.ratios
                                 else '') for result in ran], fontsize=8)
    axes.set_xticks(range(len(results)),
                    [textwrap.fill(result.scenario.title, 20)
                     + '\n' + textwrap.fill(f'(ratio: × {result.scenario.baseline.name})', 20)
                     for result in results], fontsize=8)
    axes.set_ylabel('requests per second')
    axes.set_title(f'personapi as shipped against the ceilings on gunicorn as it ships, and '
                   f'on its settings (same-config) ({subtitle})')
    axes.legend()
    axes.margins(y=0.15)
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


# --- Profile --------------------------------------------------------------------------------

PROFILE_RATE = 200  # samples per second and process


def profile(app, scenario, databases, sink, args):
    """Sample every worker of `app` with py-spy during one run; print where the time goes."""
    label = f'profile-{app.key}-{scenario.key}'
    database, raw = database_for(scenario, databases), WORK / f'{label}.txt'
    sink.reset(scenario.smtp_delay)
    with serve(app, database, sink.port, args.gunicorn_args, label) as server:
        wrk(server, scenario, args.warmup, 'pw')
        workers = workers_of(server.process.pid)
        # --gil: only the thread that holds the GIL, so a sample is a moment of Python running
        # (not of a thread waiting for a socket, a lock or an fsync).
        spy = subprocess.Popen([str(BIN / 'py-spy'), 'record', '--subprocesses', '--gil',
                                '--nonblocking', '-r', str(PROFILE_RATE), '-f', 'raw',
                                '-o', str(raw), '-d', str(args.seconds),
                                '-p', str(server.process.pid)], stdout=subprocess.DEVNULL)
        try:
            before = cpu_seconds(workers)
            run = wrk(server, scenario, args.seconds, 'p')
            cpu_us = 1e6 * (cpu_seconds(workers) - before) / max(run['requests'], 1)
        finally:
            spy.wait(args.seconds + 30)
    print_profile(app, scenario, raw, run['requests'], cpu_us)


def print_profile(app, scenario, raw, requests, cpu_us):
    own, total, samples = collections.Counter(), collections.Counter(), 0
    for line in raw.read_text().splitlines():
        stack, count = line.rsplit(' ', 1)
        # A frame reads "function (file:line)"; the line is dropped to add up whole functions,
        # and the process frame, to add up all workers.
        frames = [re.sub(r':\d+\)$', ')', frame) for frame in stack.split(';')
                  if not frame.startswith('process ')]
        if not frames:
            continue
        samples += int(count)
        own[frames[-1]] += int(count)
        for frame in set(frames):
            total[frame] += int(count)
    per_request = 1e6 / PROFILE_RATE / max(requests, 1)  # µs a sample stands for, per request
    print(f'\n## {app.name}, {scenario.title}: {requests} requests; per request, {cpu_us:.0f} µs of the '
          f'workers\' CPU, {samples * per_request:.0f} µs of it running Python')
    for title, counter in (('own time', own), ('with callees', total)):
        print(f'  {title} (% of the Python time, µs per request):')
        for frame, count in counter.most_common(40):
            print(f'    {100 * count / samples:5.1f}% {count * per_request:6.0f} µs  {frame}')


# --- Main -----------------------------------------------------------------------------------

def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--only', default='', help='scenario keys, comma-separated')
    parser.add_argument('--rounds', type=int, default=2)
    parser.add_argument('--seconds', type=int, default=8, help='measured seconds per run')
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--drain', type=int, default=120,
                        help='seconds to wait for the mails after a "mail delivered" run')
    parser.add_argument('--large', type=int, default=1_000_000,
                        help='persons in get-1m and the list-1m scenarios')
    parser.add_argument('--gunicorn-args', type=shlex.split, default=[],
                        help='flags for every app, after their settings files')
    parser.add_argument('--no-results', action='store_true',
                        help='leave RESULTS.md and results.png as they are (the chart goes '
                             'to bench/work/)')
    parser.add_argument('--quick', action='store_true',
                        help='by default one round of 3 s, 100,000 persons in the 1m scenarios: '
                             'a smoke test of the bench, whose figures mean little; implies '
                             '--no-results')
    parser.add_argument('--profile', nargs='?', const=SERVICE.key, choices=APPS,
                        help='sample this app (default: the service) with py-spy instead of '
                             'measuring')
    parser.add_argument('--no-instructions', dest='instructions', action='store_false',
                        help='skip the instruction counts (callgrind, a few minutes)')
    args = parser.parse_args(argv)
    if args.quick:  # its figures, unless given
        parser.set_defaults(rounds=1, seconds=3, warmup=1, large=100_000, no_results=True,
                            instructions=False)
        args = parser.parse_args(argv)
    chosen = [s for s in scenarios(args.large) if not args.only or s.key in args.only.split(',')]
    return args, chosen


def main(argv):
    args, chosen = parse(argv)
    WORK.mkdir(exist_ok=True)
    engines = [engine for engine in dict.fromkeys(scenario.engine for scenario in chosen)
               if engine == 'sqlite' or server_answers(engine)]
    if any(scenario.mode == 'idle' for scenario in chosen) and not idle.allow_files(
            2 * idle.IDLE):
        print(f'this process may not open {2 * idle.IDLE:,} files (ulimit -n): the idle '
              'scenario is skipped', flush=True)
        chosen = [scenario for scenario in chosen if scenario.mode != 'idle']
    chosen = [scenario for scenario in chosen if scenario.engine in engines]
    sink = Sink()
    controller = Controller(sink, hostname='127.0.0.1', port=free_port())
    controller.start()
    sink.port = controller.port
    try:
        with contextlib.ExitStack() as stack:
            databases = seed_databases(chosen, stack)
            if args.profile:
                for scenario in chosen:
                    profile(APPS[args.profile], scenario, databases, sink, args)
                return
            results = [run_scenario(scenario, databases, sink, args) for scenario in chosen]
    finally:
        controller.stop()
    kind = 'quick run, not a measurement' if args.quick else f'{args.rounds} rounds'
    report = ['## Latest run', '', *environment(args, [e for e in engines if e != 'sqlite']),
              '', *headline(results), '', '### Every figure', '', *table(results), '',
              *idle_table(results), '### Targets', '', *targets(results), '',
              *instruction_counts(WORK / f'seed-{SEED_PERSONS}.db' if args.instructions
                                  else None)]
    print('\n' + '\n'.join(report))
    chart = WORK / 'results.png' if args.no_results else CHART
    draw(results, chart, f'{datetime.date.today()}, {kind}')
    print(f'\nchart: {chart}')
    if not args.no_results:
        write_results(report)


def seed_databases(chosen, stack):
    """{persons: a seeded SQLite template} and {engine: the URL of its server's seeded
    bench database}, for the chosen scenarios (and SQLite's 10,000 for the counts)."""
    databases = {}
    for persons in sorted({SEED_PERSONS} | {s.persons for s in chosen if s.engine == 'sqlite'}):
        start = time.monotonic()
        databases[persons] = WORK / f'seed-{persons}.db'
        seed(databases[persons], persons)
        print(f'seeded {persons:,} persons in {time.monotonic() - start:.1f} s', flush=True)
    for engine in dict.fromkeys(s.engine for s in chosen if s.engine != 'sqlite'):
        databases[engine] = stack.enter_context(server_database(engine, SEED_PERSONS))
        print(f'seeded {SEED_PERSONS:,} persons in {ENGINE_NAMES[engine]}', flush=True)
    return databases


def run_scenario(scenario, databases, sink, args):
    runs = {app.name: [] for app in scenario.apps}
    for round_ in range(args.rounds):
        # Reversed every other round: the place in the order weighs on each app alike.
        for app in scenario.apps[::-1] if round_ % 2 else scenario.apps:
            label = f'{scenario.key}-{app.key}-{round_}'
            run = MEASURES[scenario.mode](app, scenario, databases, sink, args, label)
            runs[app.name].append(run)
            print(f'{scenario.key} {app.name} round {round_ + 1}: ' + (
                f'{run["rps"]:.0f} req/s, p99 {run["p99_us"] / 1000:.1f} ms' if 'rps' in run
                else f'{run["within_1s"]} of {run["probes"]} GETs answered within 1 s'),
                flush=True)
    summaries = {name: summarise(app_runs) for name, app_runs in runs.items()}
    if scenario.mode == 'idle':
        return Result(scenario, summaries, {})
    compared = scenario.apps[scenario.apps.index(scenario.baseline) + 1:]
    ratios = {app.name: per_round(runs, scenario.baseline, app) for app in compared}
    same_config = per_round(runs, scenario.same_config, SERVICE) if scenario.same_config \
        else None
    return Result(scenario, summaries, ratios, same_config)


def per_round(runs, baseline, app):
    """`app`'s req/s over `baseline`'s, round by round."""
    return [mine['rps'] / base['rps'] for base, mine in zip(runs[baseline.name], runs[app.name])]


if __name__ == '__main__':
    main(sys.argv[1:])

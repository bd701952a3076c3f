"""`make bench`: the service against the ceilings of bench/ceiling.py, under the same gunicorn
settings, with wrk.

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

A scenario is one entry of scenarios(): its load, its apps (an App is a settings file, an
optional application and extra environment), and the one the others are compared with.
"""

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import datetime
import http.client
import importlib.metadata
import json
import os
import platform
import re
import resource
import runpy
import shlex
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from aiosmtpd.controller import Controller

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the service's modules and this package, from any folder
BENCH = ROOT / 'bench'
WORK = BENCH / 'work'
RESULTS = BENCH / 'RESULTS.md'
CHART = BENCH / 'results.png'
BIN = Path(sys.executable).parent
BEGIN, END = '<!-- bench:begin -->', '<!-- bench:end -->'
WRK_THREADS = 2
SEED_PERSONS = 10_000
RATE_LIMIT = '1000000/second'


@dataclasses.dataclass(frozen=True)
class App:
    key: str
    name: str
    conf: str  # gunicorn settings file
    wsgi: str = ''  # the application, when not the settings file's
    mails: bool = False  # whether it sends welcome mail
    env: tuple = ()  # (name, value) pairs added to its environment


BARE = App('bare', 'bare ceiling', 'bench/gunicorn_ceiling.conf.py')
MAIL = App('mail', 'mail ceiling', 'bench/gunicorn_ceiling.conf.py', 'bench.ceiling:mail_app',
           mails=True)
SERVICE = App('service', 'personapi', 'gunicorn.conf.py', mails=True)
NO_METRICS = App('no-metrics', 'personapi, METRICS=off', 'gunicorn.conf.py', mails=True,
                 env=(('METRICS', 'off'),))
APPS = {app.key: app for app in (BARE, MAIL, SERVICE, NO_METRICS)}


@dataclasses.dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    mode: str  # 'get' or 'post'
    connections: int
    persons: int
    apps: tuple  # served in this order in each round
    baseline: App  # the apps after it in `apps` are reported as a ratio to it
    smtp_delay: float = 0.0
    await_mail: bool = False  # after the load, wait until every mail is delivered


def scenarios(large):
    return [Scenario('get', 'GET /person/{id}', 'get', 32, SEED_PERSONS,
                     (BARE, MAIL, SERVICE), BARE),
            Scenario('post', 'POST /person, mail delivered', 'post', 16, SEED_PERSONS,
                     (BARE, MAIL, SERVICE), MAIL, await_mail=True),
            Scenario('post-slow-smtp', 'POST, SMTP 200 ms', 'post', 16, SEED_PERSONS,
                     (MAIL, SERVICE), MAIL, smtp_delay=0.2),
            Scenario('get-1m', f'GET /person/{{id}}, {large:,} persons', 'get', 32, large,
                     (BARE, SERVICE), BARE),
            Scenario('get-metrics', 'GET, metrics on against off', 'get', 32, SEED_PERSONS,
                     (NO_METRICS, SERVICE), NO_METRICS),
            Scenario('post-metrics', 'POST, metrics on against off', 'post', 16, SEED_PERSONS,
                     (NO_METRICS, SERVICE), NO_METRICS, await_mail=True)]


# --- Database -------------------------------------------------------------------------------

def seed(path, persons):
    """A database with the service's schema and `persons` rows, in one bulk transaction."""
    path.unlink(missing_ok=True)
    import models

    models.connect(f'sqlite:///{path}')
    models.migrate()
    models.db.close()
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute('PRAGMA synchronous=OFF')  # a seed needs no durability
    connection.execute('BEGIN')
    connection.executemany(
        'INSERT INTO person (id, first_name, last_name, email, email_key) VALUES (?, ?, ?, ?, ?)',
        ((i, f'First{i}', f'Last{i}', f'person{i}@example.org', f'person{i}@example.org')
         for i in range(1, persons + 1)))
    connection.execute('COMMIT')
    connection.execute('PRAGMA wal_checkpoint(TRUNCATE)')  # the template is one file to copy
    connection.close()


def fresh_copy(template):
    target = WORK / 'run.db'
    for suffix in ('', '-wal', '-shm'):
        Path(f'{target}{suffix}').unlink(missing_ok=True)
    shutil.copyfile(template, target)
    # Written out now: the kernel flushing a large copy would weigh on the first app's run.
    with open(target, 'rb+') as copy:
        os.fsync(copy.fileno())
    return target


def scalar(path, sql):
    with contextlib.closing(sqlite3.connect(path, timeout=15)) as connection:
        return connection.execute(sql).fetchone()[0]


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

def free_port():
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


def workers_of(master_pid):
    pids = []
    for stat in Path('/proc').glob('[0-9]*/stat'):
        with contextlib.suppress(OSError):
            # The parent pid is the second field after the parenthesised command name.
            if int(stat.read_text().rsplit(')', 1)[1].split()[1]) == master_pid:
                pids.append(int(stat.parent.name))
    return pids


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


def wait_ready(server, seconds=30):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f'gunicorn exited; see {server.log}')
        with contextlib.suppress(OSError):
            connection = http.client.HTTPConnection('127.0.0.1', server.port, timeout=2)
            connection.request('GET', '/person/1')
            if connection.getresponse().status == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f'gunicorn not ready after {seconds} s; see {server.log}')


@contextlib.contextmanager
def serve(app, database, sink_port, gunicorn_args, label):
    """gunicorn with `app`'s settings on a free loopback port; stopped whatever happens."""
    port, log = free_port(), WORK / f'{label}.log'
    # wrk is one address standing for many clients: the write limit stays on (its cost is
    # measured) but high enough never to refuse.
    env = {**os.environ, 'DATABASE_URL': f'sqlite:///{database}', 'RATE_LIMIT': RATE_LIMIT,
           'SMTP_HOST': '127.0.0.1', 'SMTP_PORT': str(sink_port), **dict(app.env)}
    command = [str(BIN / 'gunicorn'), '-c', app.conf, '--bind', f'127.0.0.1:{port}',
               *gunicorn_args, *([app.wsgi] if app.wsgi else [])]
    with open(log, 'w') as output:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=output,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(port, process, log)
    try:
        wait_ready(server)
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

def wrk(server, scenario, seconds, tag):
    env = {**os.environ, 'BENCH_MODE': scenario.mode, 'BENCH_PERSONS': str(scenario.persons),
           'BENCH_TAG': tag}
    command = ['wrk', f'-t{WRK_THREADS}', f'-c{scenario.connections}', f'-d{seconds}s',
               '--timeout', '10s', '-s', str(BENCH / 'wrk.lua'), f'http://127.0.0.1:{server.port}']
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True,
                          timeout=seconds + 60)
    return json.loads([line for line in done.stdout.splitlines() if line.startswith('{')][-1])


def persons_created(database):
    return scalar(database, 'SELECT count(*) FROM person') - SEED_PERSONS


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


def measure(app, scenario, template, sink, args, label):
    """One run of `app` on `scenario`: warm-up, measured wrk run, memory, mail."""
    database = fresh_copy(template)
    sink.reset(scenario.smtp_delay)
    with serve(app, database, sink.port, args.gunicorn_args, label) as server:
        wrk(server, scenario, args.warmup, f'{label}w')
        workers = workers_of(server.process.pid)
        ours = [*workers, server.process.pid, os.getpid()]  # the sink runs in this process
        before = cpu_seconds(workers), cpu_seconds(ours), machine_busy_seconds(), wrk_seconds()
        run = wrk(server, scenario, args.seconds, label)
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


# --- Report ---------------------------------------------------------------------------------

@dataclasses.dataclass
class Result:
    scenario: Scenario
    rows: dict  # app name -> summarise() of its rounds
    ratios: dict  # app name -> its req/s over the baseline's, per round (apps after the baseline)


def summarise(runs):
    """The mean of the rounds' figures, the worst of the errors and memory."""
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
    """The app's own cost of a GET, counted in instructions (bench/instructions.py): the
    same at every run, where req/s moves with the machine's load."""
    title = '### Instructions per GET /person/{id}, in-process (callgrind)'
    if template is None:
        return []
    if not shutil.which('valgrind'):
        return [title, '', 'Not counted: valgrind is not installed.']
    from bench import instructions

    counts = instructions.measure(template, SEED_PERSONS)
    return [title, '', '| app | instructions per GET | against the bare ceiling |',
            '|---|---:|---:|', *instructions.report(counts)]


def headline(results):
    """The apps by scenario, req/s, each compared with its scenario's baseline."""
    apps = list(dict.fromkeys(app for result in results for app in result.scenario.apps))
    lines = ['| | ' + ' | '.join(result.scenario.title for result in results) + ' |',
             '|---|' + '---:|' * len(results)]
    for app in apps:
        cells = []
        for result in results:
            row, ratio = result.rows.get(app.name), ratio_text(result, app.name)
            cell = '—' if row is None else f'{row["rps"]:,.0f}'
            if ratio:
                cell += f' ({ratio}× {result.scenario.baseline.name})'
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
    for result in results:
        for name, row in result.rows.items():
            ratios = result.ratios.get(name)
            ratio = (f'**{statistics.mean(ratios):.2f}** ({", ".join(f"{r:.2f}" for r in ratios)})'
                     if ratios else '1' if name == result.scenario.baseline.name else '')
            lines.append(f'| {result.scenario.title} | {name} | {row["rps"]:.0f} | {ratio} '
                         f'| {row["p50"]:.1f} | {row["p99"]:.1f} | {row["cpu"]:.2f} '
                         f'| {row["non2xx"]} | {row["socket"]} | {row["locked"]} '
                         f'| {mail_text(row)} | {row["rss"]:.0f} | {row["others"]:.0f} |')
    return lines


def targets(results):
    """The targets, each with its measured figure and whether it is met."""
    by_key = {result.scenario.key: result for result in results}
    checks = []

    def check(label, met, figure):
        checks.append(f'- {"met" if met else "**MISSED**"}: {label}: {figure}')

    def ratio(key):
        return statistics.mean(by_key[key].ratios[SERVICE.name])

    def service(key):
        return by_key[key].rows[SERVICE.name]

    if 'get' in by_key:
        check('GET ≥ 0.85× the bare ceiling', ratio('get') >= 0.85, f'{ratio("get"):.2f}')
    if 'post' in by_key:
        check('POST with every mail delivered ≥ 0.75× the mail ceiling', ratio('post') >= 0.75,
              f'{ratio("post"):.2f}')
    for key in ('post', 'post-slow-smtp'):
        if key in by_key:
            mine, ceiling = service(key)['p99'], by_key[key].rows[MAIL.name]['p99']
            check(f'{by_key[key].scenario.title}: p99 ≤ the mail ceiling\'s', mine <= ceiling,
                  f'{mine:.1f} ms vs {ceiling:.1f} ms')
    if 'post' in by_key and 'post-slow-smtp' in by_key:
        share = service('post-slow-smtp')['rps'] / service('post')['rps']
        check('POST with a 200 ms SMTP server ≥ 0.90 of POST', share >= 0.90, f'{share:.2f}')
    for key in ('get-metrics', 'post-metrics'):
        if key in by_key:
            check(f'{by_key[key].scenario.title}: ≥ 0.95', ratio(key) >= 0.95, f'{ratio(key):.2f}')
    if 'get' in by_key and 'get-1m' in by_key:
        small, large = service('get')['p99'], service('get-1m')['p99']
        check('GET p99 at the large database ≤ 1.5× the 10k one', large <= 1.5 * small,
              f'{large:.1f} ms vs {small:.1f} ms ({large / small:.2f}×)')
    rows = [(result.scenario, name, row) for result in results for name, row in result.rows.items()]
    errors = sum(row['non2xx'] + row['socket'] + row['locked']
                 for _, name, row in rows if name == SERVICE.name)
    check('zero non-2xx, socket errors and "database is locked"', errors == 0, str(errors))
    unsent = [f'{name}: {row["mails"]} of {row["created"]}' for scenario, name, row in rows
              if scenario.await_mail and 'mails' in row
              and (row['mails'] != row['created'] or row['drain'] is None)]
    check('every mail delivered where awaited, by every app', not unsent,
          ', '.join(unsent) or 'all')
    rss = max(row['rss'] for _, name, row in rows if name == SERVICE.name)
    check('RSS per worker < 60 MB', rss < 60, f'{rss:.0f} MB')
    return checks


def environment(args):
    settings = runpy.run_path(str(ROOT / 'gunicorn.conf.py'))
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
            f'- Versions: Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}, '
            f'{versions}, wrk {wrk_version}',
            f'- gunicorn.conf.py, for the service and both ceilings: '
            f'{getattr(worker_class, "__name__", worker_class)}, {settings["workers"]} workers, '
            f'{settings["threads"]} threads, keepalive {settings["keepalive"]} s; '
            f'extra flags: {flags}',
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
    axes.set_title(f'personapi against the ceilings ({subtitle})')
    axes.legend()
    axes.margins(y=0.15)
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


# --- Profile --------------------------------------------------------------------------------

PROFILE_RATE = 200  # samples per second and process


def profile(app, scenario, template, sink, args):
    """Sample every worker of `app` with py-spy during one run; print where the time goes."""
    label = f'profile-{app.key}-{scenario.key}'
    database, raw = fresh_copy(template), WORK / f'{label}.txt'
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
    parser.add_argument('--large', type=int, default=1_000_000, help='persons in get-1m')
    parser.add_argument('--gunicorn-args', type=shlex.split, default=[],
                        help='flags for every app, after their settings files')
    parser.add_argument('--no-results', action='store_true',
                        help='leave RESULTS.md and results.png as they are (the chart goes '
                             'to bench/work/)')
    parser.add_argument('--quick', action='store_true',
                        help='by default one round of 3 s, 100,000 persons in get-1m: a smoke '
                             'test of the bench, whose figures mean little; implies --no-results')
    parser.add_argument('--profile', nargs='?', const=SERVICE.key, choices=APPS,
                        help='sample this app (default: the service) with py-spy instead of '
                             'measuring')
    args = parser.parse_args(argv)
    if args.quick:  # its figures, unless given
        parser.set_defaults(rounds=1, seconds=3, warmup=1, large=100_000, no_results=True)
        args = parser.parse_args(argv)
    chosen = [s for s in scenarios(args.large) if not args.only or s.key in args.only.split(',')]
    return args, chosen


def main(argv):
    args, chosen = parse(argv)
    WORK.mkdir(exist_ok=True)
    templates = {}
    for persons in sorted({scenario.persons for scenario in chosen}):
        start = time.monotonic()
        templates[persons] = WORK / f'seed-{persons}.db'
        seed(templates[persons], persons)
        print(f'seeded {persons:,} persons in {time.monotonic() - start:.1f} s', flush=True)
    sink = Sink()
    controller = Controller(sink, hostname='127.0.0.1', port=free_port())
    controller.start()
    sink.port = controller.port
    try:
        if args.profile:
            for scenario in chosen:
                profile(APPS[args.profile], scenario, templates[scenario.persons], sink, args)
            return
        results = [run_scenario(scenario, templates[scenario.persons], sink, args)
                   for scenario in chosen]
    finally:
        controller.stop()
    kind = 'quick run, not a measurement' if args.quick else f'{args.rounds} rounds'
    report = ['## Latest run', '', *environment(args), '', *headline(results), '',
              '### Every figure', '', *table(results), '', '### Targets', '', *targets(results),
              '', *instruction_counts(templates.get(SEED_PERSONS))]
    print('\n' + '\n'.join(report))
    chart = WORK / 'results.png' if args.no_results else CHART
    draw(results, chart, f'{datetime.date.today()}, {kind}')
    print(f'\nchart: {chart}')
    if not args.no_results:
        write_results(report)


def run_scenario(scenario, template, sink, args):
    runs = {app.name: [] for app in scenario.apps}
    for round_ in range(args.rounds):
        # Reversed every other round: the place in the order weighs on each app alike.
        for app in scenario.apps[::-1] if round_ % 2 else scenario.apps:
            label = f'{scenario.key}-{app.key}-{round_}'
            run = measure(app, scenario, template, sink, args, label)
            runs[app.name].append(run)
            print(f'{scenario.key} {app.name} round {round_ + 1}: {run["rps"]:.0f} req/s, '
                  f'p99 {run["p99_us"] / 1000:.1f} ms', flush=True)
    compared = scenario.apps[scenario.apps.index(scenario.baseline) + 1:]
    ratios = {app.name: [mine['rps'] / base['rps']
                         for base, mine in zip(runs[scenario.baseline.name], runs[app.name])]
              for app in compared}
    return Result(scenario, {name: summarise(app_runs) for name, app_runs in runs.items()}, ratios)


if __name__ == '__main__':
    main(sys.argv[1:])

"""`make bench`: the service against bench/ceiling.py, under the same gunicorn settings, with wrk.

Each scenario serves the ceiling and the service in turn (A B A B: the machine is noisy), each
on a fresh copy of a database seeded by a bulk insert, with a real SMTP sink, and reports
every figure as a ratio to the ceiling of the same run. Prints the table and writes it into
bench/RESULTS.md between its markers (the notes around them are kept).

    python bench/run.py                      # the whole run, as `make bench`
    python bench/run.py --only get --no-results --gunicorn-args='--worker-class sync'
    python bench/run.py --profile            # py-spy on the service's workers instead
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
import time
from pathlib import Path

from aiosmtpd.controller import Controller

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / 'bench'
WORK = BENCH / 'work'
RESULTS = BENCH / 'RESULTS.md'
BIN = Path(sys.executable).parent
BEGIN, END = '<!-- bench:begin -->', '<!-- bench:end -->'
WRK_THREADS = 2
SEED_PERSONS = 10_000
RATE_LIMIT = '1000000/second'


@dataclasses.dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    mode: str  # 'get' or 'post'
    connections: int
    persons: int
    smtp_delay: float = 0.0
    metrics: bool = True  # METRICS for the service


@dataclasses.dataclass(frozen=True)
class App:
    name: str
    conf: str
    mails: bool  # whether it sends welcome mail


SERVICE = App('service', 'gunicorn.conf.py', mails=True)
CEILING = App('ceiling', 'bench/gunicorn_ceiling.conf.py', mails=False)


def scenarios(large):
    return [Scenario('get', 'GET /person/{id}, 10k persons', 'get', 32, SEED_PERSONS),
            Scenario('post', 'POST /person', 'post', 16, SEED_PERSONS),
            Scenario('post-slow-smtp', 'POST /person, SMTP 200 ms', 'post', 16, SEED_PERSONS,
                     smtp_delay=0.2),
            Scenario('get-1m', f'GET /person/{{id}}, {large:,} persons', 'get', 32, large),
            Scenario('get-no-metrics', 'GET /person/{id}, METRICS=off', 'get', 32, SEED_PERSONS,
                     metrics=False),
            Scenario('post-no-metrics', 'POST /person, METRICS=off', 'post', 16, SEED_PERSONS,
                     metrics=False)]


# --- Database -------------------------------------------------------------------------------

def seed(path, persons):
    """A database with the service's schema and `persons` rows, in one bulk transaction."""
    path.unlink(missing_ok=True)
    sys.path.insert(0, str(ROOT))
    import models

    models.connect(f'sqlite:///{path}')
    models.create_schema()
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
def serve(app, database, sink_port, gunicorn_args, label, metrics=True):
    """gunicorn with `app`'s settings on a free loopback port; stopped whatever happens."""
    port, log = free_port(), WORK / f'{label}.log'
    # wrk is one address standing for many clients: the write limit stays on (its cost is
    # measured) but high enough never to refuse.
    env = {**os.environ, 'DATABASE_URL': f'sqlite:///{database}', 'RATE_LIMIT': RATE_LIMIT,
           'SMTP_HOST': '127.0.0.1', 'SMTP_PORT': str(sink_port),
           'METRICS': 'on' if metrics else 'off'}
    command = [str(BIN / 'gunicorn'), '-c', app.conf, '--bind', f'127.0.0.1:{port}',
               *gunicorn_args]
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
    with serve(app, database, sink.port, args.gunicorn_args, label, scenario.metrics) as server:
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
        if scenario.mode == 'post':
            run['mails_at_end'] = len(sink.recipients)
            if app.mails:
                run['drain_s'] = wait_for_mail(sink, database, args.drain)
                run['mails'] = len(sink.recipients)
            # Counted last: requests in flight when wrk stopped still commit.
            run['created'] = persons_created(database)
    run['locked'] = server.log.read_text(errors='replace').count('database is locked')
    run['rps'] = run['requests'] / (run['duration_us'] / 1e6)
    return run


# --- Report ---------------------------------------------------------------------------------

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
        drains = [run['drain_s'] for run in runs]
        row['drain'] = None if None in drains else max(drains)
    return row


def table(results):
    lines = ['| scenario | app | req/s | ratio to ceiling (per round) | p50 ms | p99 ms '
             '| workers\' CPU ms per request | non-2xx | socket errors | "locked" '
             '| mails / persons created | max RSS per worker MB | other programs\' CPU % |',
             '|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|']
    for scenario, rows, ratios in results:
        for name, row in rows.items():
            ratio = (f'**{statistics.mean(ratios):.2f}** '
                     f'({", ".join(f"{r:.2f}" for r in ratios)})' if name == 'service' else '1')
            mail = '–'
            if 'mails' in row:
                drain = 'not all within the wait' if row['drain'] is None \
                    else f'all {row["drain"]:.1f} s after the load'
                mail = (f'{row["mails"]} / {row["created"]} ({row["mails_at_end"]} when the '
                        f'load ended; {drain})')
            lines.append(f'| {scenario.title} | {name} | {row["rps"]:.0f} | {ratio} '
                         f'| {row["p50"]:.1f} | {row["p99"]:.1f} | {row["cpu"]:.2f} | {row["non2xx"]} '
                         f'| {row["socket"]} | {row["locked"]} | {mail} | {row["rss"]:.0f} '
                         f'| {row["others"]:.0f} |')
    return lines


def targets(results):
    """The issue's targets, each with its measured figure and whether it is met."""
    by_key = {scenario.key: (rows, ratios) for scenario, rows, ratios in results}
    checks = []

    def check(label, met, figure):
        checks.append(f'- {"met" if met else "**MISSED**"}: {label}: {figure}')

    if 'get' in by_key:
        ratio = statistics.mean(by_key['get'][1])
        check('GET ≥ 0.80 of the ceiling', ratio >= 0.80, f'{ratio:.2f}')
    if 'post' in by_key:
        ratio, row = statistics.mean(by_key['post'][1]), by_key['post'][0]['service']
        delivered = row['mails'] == row['created'] and row['drain'] is not None
        check('POST ≥ 0.50 of the ceiling, every mail delivered', ratio >= 0.50 and delivered,
              f'{ratio:.2f}, {row["mails"]} of {row["created"]} mails')
    if 'post' in by_key and 'post-slow-smtp' in by_key:
        fast = by_key['post'][0]['service']
        slow = by_key['post-slow-smtp'][0]['service']
        share = slow['rps'] / fast['rps']
        check('POST with a 200 ms SMTP server ≥ 0.90 of POST', share >= 0.90, f'{share:.2f}')
        check('its p99 < 50 ms', slow['p99'] < 50, f'{slow["p99"]:.1f} ms')
    if 'get' in by_key and 'get-1m' in by_key:
        small, large = by_key['get'][0]['service']['p99'], by_key['get-1m'][0]['service']['p99']
        check('GET p99 at the large database ≤ 1.5× the 10k one', large <= 1.5 * small,
              f'{large:.1f} ms vs {small:.1f} ms ({large / small:.2f}×)')
    for mode in ('get', 'post'):
        if mode in by_key and f'{mode}-no-metrics' in by_key:
            # Each against its own ceiling: the rounds ran at different moments.
            on, off = (statistics.mean(by_key[key][1]) for key in (mode, f'{mode}-no-metrics'))
            check(f'{mode.upper()} with metrics ≥ 0.95 of METRICS=off (ratios to the ceiling)',
                  on >= 0.95 * off, f'{on / off:.2f} ({on:.2f} against {off:.2f})')
    service = [rows['service'] for rows, _ in by_key.values()]
    errors = sum(row['non2xx'] + row['socket'] + row['locked'] for row in service)
    check('zero non-2xx, socket errors and "database is locked"', errors == 0, str(errors))
    unsent = [f'{row["mails"]} of {row["created"]}' for row in service
              if 'mails' in row and row['mails'] != row['created']]
    check('mails received = persons created', not unsent, ', '.join(unsent) or 'all')
    rss = max(row['rss'] for row in service)
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
    return [f'- Date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}',
            f'- Machine: {os.cpu_count()} cores ({cpu}), Linux {platform.release()}; '
            f'wrk ({WRK_THREADS} threads) shares the cores with the server',
            f'- Versions: Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}, '
            f'{versions}, wrk {wrk_version}',
            f'- gunicorn.conf.py: {settings["worker_class"]}, {settings["workers"]} workers, '
            f'{settings["threads"]} threads, keepalive {settings["keepalive"]} s; '
            f'extra flags: {flags}',
            f'- Method: {args.rounds} rounds of ceiling then service per scenario, '
            f'{args.warmup} s warm-up then {args.seconds} s measured; req/s, p50 and p99 are '
            f'the rounds\' mean; wrk counts status ≥ 400 as non-2xx (neither app answers '
            f'1xx or 3xx); mails waited for {args.drain} s at most after each POST run; '
            f'RATE_LIMIT={RATE_LIMIT} (on, never refusing)']


def write_results(lines):
    text = RESULTS.read_text() if RESULTS.exists() else f'# Benchmark results\n\n{BEGIN}\n{END}\n'
    head, rest = text.split(BEGIN, 1)
    RESULTS.write_text(f'{head}{BEGIN}\n' + '\n'.join(lines) + f'\n{END}{rest.split(END, 1)[1]}')


# --- Profile --------------------------------------------------------------------------------

def profile(scenario, template, sink, args):
    """Sample every service worker with py-spy during one run; print where the time goes."""
    database, raw = fresh_copy(template), WORK / f'profile-{scenario.key}.txt'
    sink.reset(scenario.smtp_delay)
    with serve(SERVICE, database, sink.port, args.gunicorn_args, f'profile-{scenario.key}') \
            as server:
        wrk(server, scenario, args.warmup, 'pw')
        spy = subprocess.Popen([str(BIN / 'py-spy'), 'record', '--subprocesses', '--nonblocking',
                                '-r', '200', '-f', 'raw', '-o', str(raw), '-d', str(args.seconds),
                                '-p', str(server.process.pid)], stdout=subprocess.DEVNULL)
        try:
            wrk(server, scenario, args.seconds, 'p')
        finally:
            spy.wait(args.seconds + 30)
    print_profile(scenario, raw)


def print_profile(scenario, raw):
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
    print(f'\n## {scenario.title}: {samples} samples of busy threads in all workers')
    for title, counter in (('own time', own), ('with callees', total)):
        print(f'  {title}:')
        for frame, count in counter.most_common(25):
            print(f'    {100 * count / samples:5.1f}%  {frame}')


# --- Main -----------------------------------------------------------------------------------

def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--only', default='', help='scenario keys, comma-separated')
    parser.add_argument('--rounds', type=int, default=2)
    parser.add_argument('--seconds', type=int, default=8, help='measured seconds per run')
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--drain', type=int, default=120,
                        help='seconds to wait for the mails after a POST run')
    parser.add_argument('--large', type=int, default=1_000_000, help='persons in get-1m')
    parser.add_argument('--gunicorn-args', type=shlex.split, default=[],
                        help='flags for both apps, after their settings files')
    parser.add_argument('--no-results', action='store_true', help='leave RESULTS.md as it is')
    parser.add_argument('--profile', action='store_true',
                        help='sample the service with py-spy instead of measuring')
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
                profile(scenario, templates[scenario.persons], sink, args)
            return
        results = [run_scenario(scenario, templates[scenario.persons], sink, args)
                   for scenario in chosen]
    finally:
        controller.stop()
    report = ['## Latest run', '', *environment(args), '', *table(results), '',
              '### Targets', '', *targets(results)]
    print('\n' + '\n'.join(report))
    if not args.no_results:
        write_results(report)


def run_scenario(scenario, template, sink, args):
    runs = {CEILING.name: [], SERVICE.name: []}
    for round_ in range(args.rounds):
        for app in (CEILING, SERVICE):
            run = measure(app, scenario, template, sink, args, f'{scenario.key}-{app.name}-{round_}')
            runs[app.name].append(run)
            print(f'{scenario.key} {app.name} round {round_ + 1}: {run["rps"]:.0f} req/s, '
                  f'p99 {run["p99_us"] / 1000:.1f} ms', flush=True)
    ratios = [service['rps'] / ceiling['rps']
              for ceiling, service in zip(runs[CEILING.name], runs[SERVICE.name])]
    return scenario, {name: summarise(app_runs) for name, app_runs in runs.items()}, ratios


if __name__ == '__main__':
    main(sys.argv[1:])

"""Instructions per GET /person/{id} and per page of GET /person, counted by valgrind's
callgrind. Unlike req/s under wrk, which moves ±15% from one round to the next on a shared
machine, a count repeats to within a fraction of a percent (PYTHONHASHSEED fixed), so a
change of a few percent shows.

Two counts:
- in-process: the service's app against the bare ceiling's, without gunicorn: the app's
  own cost;
- a whole gunicorn worker: the service as shipped (its worker class, access log,
  middleware, metrics) against the bare ceiling on gunicorn as it ships
  (bench/gunicorn_stock.conf.py): what the server's configuration costs too.

    python bench/instructions.py            # both counts, of both requests
    python bench/instructions.py --worker   # the whole worker's only

Each app is counted twice, answering FEW and then MANY requests, so that start-up and
imports cancel out: (count(MANY) - count(FEW)) / (MANY - FEW). The service's metrics are
kept as under gunicorn (prometheus-client's multiprocess mode, in a directory of the
count's own) and flushed once after the requests: the work its flush thread does for them
is counted. Not counted: gunicorn, threads and the kernel.
"""

import concurrent.futures
import http.client
import importlib
import io
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import common  # noqa: E402  (the line above lets this file run as a script)

ROOT = common.ROOT
FEW, MANY = 100, 600
APPS = {'bare ceiling': 'bench.ceiling:app', 'personapi': 'personapi:app'}
COUNTED = re.compile(rb'Collected : (\d+)')
REQUESTS = {'get': 'GET /person/{id}', 'list': f'page of GET /person ({common.PAGE} persons)'}
PAGES = 100  # the pages a count asks for in turn, all over the table


def request_paths(kind, app_spec, database, persons):
    """The paths a count of `kind` asks for in turn, made before it starts: the persons
    1..persons, or PAGES pages after ids spread over them (with the service's own cursors
    for the service)."""
    if kind == 'get':
        return [f'/person/{number}' for number in range(1, persons + 1)]
    spread = max(persons - common.PAGE, 0)
    return common.page_paths([number * spread // PAGES for number in range(PAGES)],
                             app_spec.startswith('personapi:'), database)


def get_environ(target):
    """A WSGI environ as gunicorn makes it for `GET target` (a path and query)."""
    path, _, query = target.partition('?')
    return {'REQUEST_METHOD': 'GET', 'PATH_INFO': path, 'QUERY_STRING': query,
            'SERVER_NAME': '127.0.0.1', 'SERVER_PORT': '8000', 'SERVER_PROTOCOL': 'HTTP/1.1',
            'HTTP_HOST': '127.0.0.1:8000', 'REMOTE_ADDR': '127.0.0.1', 'wsgi.version': (1, 0),
            'wsgi.url_scheme': 'http', 'wsgi.input': io.BytesIO(), 'wsgi.errors': sys.stderr,
            'wsgi.multithread': True, 'wsgi.multiprocess': True, 'wsgi.run_once': False}


def answer_gets(app_spec, kind, requests, persons):
    """Have the app answer `requests` GETs of `kind` in turn (see request_paths); their
    statuses."""
    paths = request_paths(kind, app_spec, os.environ['DATABASE_URL'].removeprefix('sqlite:///'),
                          persons)
    module, name = app_spec.split(':')
    app = getattr(importlib.import_module(module), name)
    statuses = []

    def start_response(status, headers):
        statuses.append(status)

    for number in range(requests):
        for _ in app(get_environ(paths[number % len(paths)]), start_response):
            pass  # the whole body, as a server would iterate it
    if 'metrics' in sys.modules:  # the service's: its flush thread's work for these requests
        sys.modules['metrics'].flush()
    return statuses


def count(app_spec, kind, database, requests, persons):
    """Instructions callgrind counts for a Python that answers `requests` GETs of `kind`."""
    with tempfile.TemporaryDirectory() as samples:
        env = {**os.environ, 'PYTHONHASHSEED': '0', 'PYTHONPATH': str(ROOT),
               'DATABASE_URL': f'sqlite:///{database}', 'PROMETHEUS_MULTIPROC_DIR': samples}
        done = subprocess.run(['valgrind', '--tool=callgrind', '--callgrind-out-file=/dev/null',
                               sys.executable, __file__, '--answer', app_spec, kind,
                               str(requests), str(persons)], cwd=ROOT, env=env,
                              capture_output=True, check=True)
    return int(COUNTED.search(done.stderr).group(1))


def per_request(app_spec, kind, database, persons, few=FEW, many=MANY):
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # one valgrind per core
        low, high = pool.map(lambda n: count(app_spec, kind, database, n, persons), (few, many))
    return (high - low) / (many - few)


def measure(database, persons, few=FEW, many=MANY, kind='get'):
    """{app name: instructions per GET of `kind`} for each of APPS, reading `database`
    (seeded with `persons`)."""
    return {name: per_request(spec, kind, database, persons, few, many)
            for name, spec in APPS.items()}


# --- A whole gunicorn worker ---------------------------------------------------------------

WORKER_APPS = {'stock bare ceiling': ('bench/gunicorn_stock.conf.py', 'bench.ceiling:app'),
               'personapi': ('gunicorn.conf.py', 'personapi:app')}
WORKER_FEW, WORKER_MANY = 200, 1200
CONNECTIONS = 4
TOTALS = re.compile(r'^(?:summary|totals): (\d+)', re.MULTILINE)


def send_gets(port, paths, requests):
    """`requests` GETs of `paths` in turn over CONNECTIONS keep-alive connections in turn,
    one at a time."""
    connections = [http.client.HTTPConnection('127.0.0.1', port, timeout=120)
                   for _ in range(CONNECTIONS)]
    for number in range(requests):
        connection = connections[number % CONNECTIONS]
        connection.request('GET', paths[number % len(paths)])
        response = connection.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f'GET answered {response.status}')
    for connection in connections:
        connection.close()


def worker_total(conf, wsgi_app, database, kind, requests, persons):
    """Instructions callgrind counts in the one worker of a gunicorn that answers a few
    GETs to warm up, then `requests` of `kind`, then stops."""
    paths, port = request_paths(kind, wsgi_app, database, persons), common.free_port()
    with tempfile.TemporaryDirectory() as directory:
        samples = Path(directory)
        env = {**os.environ, 'PYTHONHASHSEED': '0', 'DATABASE_URL': f'sqlite:///{database}',
               'SMTP_HOST': '127.0.0.1', 'SMTP_PORT': str(common.free_port())}
        # A forked worker writes out.<its pid> when it exits.
        command = ['valgrind', '--tool=callgrind', f'--callgrind-out-file={samples}/out.%p',
                   str(Path(sys.executable).parent / 'gunicorn'), '-c', conf, '--workers', '1',
                   '--bind', f'127.0.0.1:{port}', wsgi_app]
        log = samples / 'gunicorn.log'
        with open(log, 'w') as output:
            master = subprocess.Popen(command, cwd=ROOT, env=env, stdout=output,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        try:
            common.wait_ready(master, port, log, seconds=300)
            worker, = common.workers_of(master.pid)
            send_gets(port, paths, requests)
        finally:
            master.terminate()
            master.wait(300)
        return int(TOTALS.search((samples / f'out.{worker}').read_text(errors='replace'))
                   .group(1))


def per_request_in_worker(conf, wsgi_app, database, persons, few=WORKER_FEW, many=WORKER_MANY,
                          kind='get'):
    """Instructions one gunicorn worker (1 process, the settings' threads) spends per GET
    of `kind` on connections kept alive: counted answering `few` and then `many` GETs, the
    difference divided by many - few, so that starting and stopping cancel out (what the
    worker does once a second does not: the count moves by a few hundred a GET)."""
    low, high = (worker_total(conf, wsgi_app, database, kind, requests, persons)
                 for requests in (few, many))
    return (high - low) / (many - few)


def measure_workers(database, persons, few=WORKER_FEW, many=WORKER_MANY, kind='get'):
    """{app name: instructions per GET of `kind` in a whole worker} for each of
    WORKER_APPS."""
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # one valgrind per core
        counts = pool.map(lambda spec: per_request_in_worker(*spec, database, persons, few, many,
                                                             kind),
                          WORKER_APPS.values())
        return dict(zip(WORKER_APPS, counts))


def report(counts):
    bare = next(iter(counts.values()))
    return [f'| {name} | {figure:,.0f} | {figure / bare:.2f}× |' for name, figure in counts.items()]


def main(argv):
    if argv[:1] == ['--answer']:
        statuses = answer_gets(argv[1], argv[2], int(argv[3]), int(argv[4]))
        sys.exit(0 if set(statuses) == {'200 OK'} else f'not all 200: {set(statuses)}')
    common.WORK.mkdir(exist_ok=True)
    database = common.WORK / 'instructions.db'
    common.seed(database, common.SEED_PERSONS)
    for kind, title in REQUESTS.items():
        print(f'\n| app | instructions per {title} | against the bare ceiling |\n|---|---:|---:|')
        if argv[:1] != ['--worker']:
            print('\n'.join(report(measure(database, common.SEED_PERSONS, kind=kind))))
        print('\n'.join(report(measure_workers(database, common.SEED_PERSONS, kind=kind))))


if __name__ == '__main__':
    main(sys.argv[1:])

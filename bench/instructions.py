"""Instructions per GET /person/{id}, counted by valgrind's callgrind: the service's app
against the bare ceiling's, in this process, without gunicorn (whose cost is the same for
both). Unlike req/s under wrk, which moves ±15% from one round to the next on a shared
machine, a count repeats to within a tenth of a percent (PYTHONHASHSEED fixed), so a
change of a few percent in the app's cost shows.

    python bench/instructions.py     # both apps and their ratio

Each app is counted twice, answering FEW and then MANY requests, so that start-up and
imports cancel out: (count(MANY) - count(FEW)) / (MANY - FEW). The service's metrics are
kept as under gunicorn (prometheus-client's multiprocess mode, in a directory of the
count's own) and flushed once after the requests: the work its flush thread does for them
is counted. Not counted: gunicorn, threads and the kernel.
"""

import concurrent.futures
import importlib
import io
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FEW, MANY = 100, 600
APPS = {'bare ceiling': 'bench.ceiling:app', 'personapi': 'personapi:app'}
COUNTED = re.compile(rb'Collected : (\d+)')


def get_environ(person_id):
    """A WSGI environ as gunicorn makes it for `GET /person/{person_id}`."""
    return {'REQUEST_METHOD': 'GET', 'PATH_INFO': f'/person/{person_id}', 'QUERY_STRING': '',
            'SERVER_NAME': '127.0.0.1', 'SERVER_PORT': '8000', 'SERVER_PROTOCOL': 'HTTP/1.1',
            'HTTP_HOST': '127.0.0.1:8000', 'REMOTE_ADDR': '127.0.0.1', 'wsgi.version': (1, 0),
            'wsgi.url_scheme': 'http', 'wsgi.input': io.BytesIO(), 'wsgi.errors': sys.stderr,
            'wsgi.multithread': True, 'wsgi.multiprocess': True, 'wsgi.run_once': False}


def answer_gets(app_spec, requests, persons):
    """Have the app answer `requests` GETs of persons 1..persons in turn; their statuses."""
    module, name = app_spec.split(':')
    app = getattr(importlib.import_module(module), name)
    statuses = []

    def start_response(status, headers):
        statuses.append(status)

    for number in range(requests):
        for _ in app(get_environ(1 + number % persons), start_response):
            pass  # the whole body, as a server would iterate it
    if 'metrics' in sys.modules:  # the service's: its flush thread's work for these requests
        sys.modules['metrics'].flush()
    return statuses


def count(app_spec, database, requests, persons):
    """Instructions callgrind counts for a Python that answers `requests` GETs."""
    with tempfile.TemporaryDirectory() as samples:
        env = {**os.environ, 'PYTHONHASHSEED': '0', 'PYTHONPATH': str(ROOT),
               'DATABASE_URL': f'sqlite:///{database}', 'PROMETHEUS_MULTIPROC_DIR': samples}
        done = subprocess.run(['valgrind', '--tool=callgrind', '--callgrind-out-file=/dev/null',
                               sys.executable, __file__, '--answer', app_spec, str(requests),
                               str(persons)], cwd=ROOT, env=env, capture_output=True,
                              check=True)
    return int(COUNTED.search(done.stderr).group(1))


def per_request(app_spec, database, persons, few=FEW, many=MANY):
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # one valgrind per core
        low, high = pool.map(lambda n: count(app_spec, database, n, persons), (few, many))
    return (high - low) / (many - few)


def measure(database, persons, few=FEW, many=MANY):
    """{app name: instructions per GET} for each of APPS, reading `database` (seeded with
    `persons`)."""
    return {name: per_request(spec, database, persons, few, many) for name, spec in APPS.items()}


def report(counts):
    bare = counts['bare ceiling']
    return [f'| {name} | {figure:,.0f} | {figure / bare:.2f}× |' for name, figure in counts.items()]


def main(argv):
    if argv[:1] == ['--answer']:
        statuses = answer_gets(argv[1], int(argv[2]), int(argv[3]))
        sys.exit(0 if set(statuses) == {'200 OK'} else f'not all 200: {set(statuses)}')
    sys.path.insert(0, str(ROOT))
    from bench import run

    run.WORK.mkdir(exist_ok=True)
    database = run.WORK / 'instructions.db'
    run.seed(database, run.SEED_PERSONS)
    print('| app | instructions per GET | against the bare ceiling |\n|---|---:|---:|')
    print('\n'.join(report(measure(database, run.SEED_PERSONS))))


if __name__ == '__main__':
    main(sys.argv[1:])

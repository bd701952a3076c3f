"""The rate limit counts for a whole instance, however many workers it has (instance://,
the default) or for every replica (redis://); a storage that cannot be reached lets writes
through, and says so in the log, /metrics and /readyz."""

import multiprocessing
import os
import re
import socket
import time
import urllib.parse
import urllib.request
import uuid

import limits
import limits.strategies
import pytest

import ratelimit
from support import Service, TcpProxy, free_port, http, wait_until

ADA = {'first_name': 'Ada', 'last_name': 'Lovelace', 'email': 'ada@example.com'}
REDIS_URL = os.environ.get('TEST_REDIS_URL')
needs_redis = pytest.mark.skipif(not REDIS_URL, reason='TEST_REDIS_URL is not set: no Redis '
                                                       'to share a rate limit through')


# --- The instance's storage, in-process -----------------------------------------------------

def hits_allowed(path, strategy, limit, hits):
    """How many of `hits` the limiter allows, counting in the file at `path`."""
    limiter = strategy(ratelimit.InstanceStorage(path))
    return sum(limiter.hit(limits.parse(limit), 'writes', 'client') for _ in range(hits))


@pytest.mark.parametrize('strategy', [limits.strategies.MovingWindowRateLimiter,
                                      limits.strategies.FixedWindowRateLimiter])
def test_processes_sharing_the_file_share_one_budget(tmp_path, strategy):
    path = str(tmp_path / 'counts.db')
    with multiprocessing.get_context('fork').Pool(4) as pool:
        allowed = pool.starmap(hits_allowed, [(path, strategy, '25/minute', 20)] * 4)
    assert sum(allowed) == 25


def test_the_moving_window_says_what_is_left_and_when_it_resets(tmp_path):
    limiter = limits.strategies.MovingWindowRateLimiter(
        ratelimit.InstanceStorage(str(tmp_path / 'counts.db')))
    limit = limits.parse('5/minute')
    first = time.time()
    for _ in range(3):
        assert limiter.hit(limit, 'writes', 'a')
    stats = limiter.get_window_stats(limit, 'writes', 'a')
    assert stats.remaining == 2 and first <= stats.reset_time - 60 <= time.time()
    assert limiter.get_window_stats(limit, 'writes', 'b').remaining == 5


def test_a_hit_stops_counting_when_its_window_has_passed(tmp_path):
    limiter = limits.strategies.MovingWindowRateLimiter(
        ratelimit.InstanceStorage(str(tmp_path / 'counts.db')))
    limit = limits.parse('2/second')
    assert limiter.hit(limit, 'w', 'a') and limiter.hit(limit, 'w', 'a')
    assert not limiter.hit(limit, 'w', 'a')
    assert wait_until(lambda: limiter.hit(limit, 'w', 'a'), timeout=5)


def test_a_new_instance_starts_with_no_counts(tmp_path, monkeypatch):
    path = str(tmp_path / 'counts.db')
    assert hits_allowed(path, limits.strategies.MovingWindowRateLimiter, '3/hour', 3) == 3
    monkeypatch.setattr(ratelimit, '_instance_file', None)  # put back after the test
    ratelimit.share_between_workers(path)  # what gunicorn's master does at start
    assert ratelimit.open_storage('instance://').path == path
    assert hits_allowed(path, limits.strategies.MovingWindowRateLimiter, '3/hour', 3) == 3


# --- A real gunicorn, a new connection per request ------------------------------------------

@pytest.fixture
def start(tmp_path):
    """start(**settings): a 2-worker service on its own SQLite database."""
    services = []

    def start(**settings):
        env = {'DATABASE_URL': f'sqlite:///{tmp_path}/persons.db', 'SMTP_PORT': '1',
               'RATE_LIMIT': '5/minute', **settings}
        services.append(Service(env, workers=2, log_path=tmp_path / 'gunicorn.log').start())
        return services[-1]
    yield start
    for service in services:
        service.kill()


def register(service, client=None):
    """POST a new person (on a new connection); the status."""
    headers = {'X-Forwarded-For': client} if client else {}
    return service.request('POST', '/person', {**ADA, 'email': f'{uuid.uuid4().hex}@example.com'},
                           headers=headers)[0]


@pytest.mark.parametrize('storage', ['instance://', 'memory://'])
def test_the_limit_holds_for_the_instance_whatever_its_workers(start, storage):
    """memory://, the former default, counted per worker: it means the instance now."""
    service = start(RATE_LIMIT_STORAGE=storage)
    assert [register(service) for _ in range(10)] == [201] * 5 + [429] * 5


def unchecked_writes(service):
    text = http_text(f'{service.url}/metrics')
    return float(re.search(r'^personapi_rate_limit_unchecked_writes_total (\S+)$', text,
                           re.MULTILINE).group(1))


def http_text(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


@pytest.fixture
def silent_server():
    """A port that takes connections and never answers: a Redis stopped with SIGSTOP."""
    with socket.create_server(('127.0.0.1', 0), backlog=100) as server:
        yield server.getsockname()[1]


@pytest.mark.parametrize('redis', ['nothing listens', 'nothing answers'])
def test_an_unreachable_storage_lets_writes_through_and_says_so(start, tmp_path, redis, request):
    port = free_port() if redis == 'nothing listens' else request.getfixturevalue('silent_server')
    service = start(RATE_LIMIT_STORAGE=f'redis://127.0.0.1:{port}/0')
    assert [register(service) for _ in range(8)] == [201] * 8
    status, _, body = service.request('GET', '/readyz')
    assert (status, body) == (200, {'status': 'ready', 'rate_limit': 'storage unreachable: '
                                                                     'writes are not limited'})
    assert wait_until(lambda: unchecked_writes(service) == 8)
    warnings = [line for line in (tmp_path / 'gunicorn.log').read_text().splitlines()
                if 'rate limit storage unreachable' in line]
    assert 1 <= len(warnings) <= 2  # at most one a minute in each worker, not one a write


@needs_redis
def test_a_redis_that_goes_away_and_comes_back(start, tmp_path):
    redis = urllib.parse.urlsplit(REDIS_URL)
    proxy = TcpProxy((redis.hostname, redis.port or 6379))
    client = f'2001:db8::{uuid.uuid4().hex[:4]}'  # keys of this test's own, behind a proxy
    service = start(RATE_LIMIT_STORAGE=f'redis://127.0.0.1:{proxy.port}/0',
                    FORWARDED_ALLOW_IPS='127.0.0.1')
    try:
        assert [register(service, client) for _ in range(6)] == [201] * 5 + [429]
        proxy.cut()
        assert [register(service, client) for _ in range(3)] == [201] * 3
        assert 'rate_limit' in service.request('GET', '/readyz')[2]
        proxy.restore()
        assert wait_until(lambda: register(service, client) == 429, timeout=20, interval=0.5)
        assert service.request('GET', '/readyz')[2] == {'status': 'ready'}
    finally:
        proxy.cut()
    assert 'rate limit storage answers again' in (tmp_path / 'gunicorn.log').read_text()

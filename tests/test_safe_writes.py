"""Writes that are safe to race and to retry: ids never reused, ETags with If-Match and
If-None-Match, Idempotency-Key on POST; in-process, then against real gunicorn."""

import contextlib
import dataclasses
import fcntl
import json
import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import peewee
import pytest
import webtest

import models
import personapi
from models import IdempotencyKey, Person
from support import Service, error_lines, one_engine
from test_api import ADA, GRACE, post, send, snapshot
from test_service import in_parallel, person


def etag(response):
    return response.headers['ETag']


def tag_of(person_id, version):
    return f'"{person_id}-{version}"'


# --- Ids ------------------------------------------------------------------------------------

def test_ids_are_never_reused_even_after_the_newest_is_deleted(client):
    first = post(client, ADA).json['id']
    newest = post(client, GRACE).json['id']
    client.delete(f'/person/{newest}', status=204)
    client.delete(f'/person/{first}', status=204)
    again = post(client, GRACE).json['id']
    assert again > newest


# --- ETags ----------------------------------------------------------------------------------

def test_every_read_and_write_of_a_person_carries_its_strong_etag(client):
    created = post(client, ADA)
    person_id = created.json['id']
    read = client.get(f'/person/{person_id}')
    assert etag(created) == etag(read) == tag_of(person_id, 1)
    replaced = client.put_json(f'/person/{person_id}', GRACE)
    patched = client.patch_json(f'/person/{person_id}', {'first_name': 'Amazing'})
    assert [etag(replaced), etag(patched)] == [tag_of(person_id, 2), tag_of(person_id, 3)]
    assert etag(client.get(f'/person/{person_id}')) == etag(patched)


WRITES = [('PUT', GRACE), ('PATCH', {'first_name': 'Amazing'}), ('DELETE', None)]


def write(client, method, person_id, body, if_match, status='*'):
    raw = json.dumps(body).encode() if body is not None else b''
    return client.request(f'/person/{person_id}', method=method, body=raw, status=status,
                          headers={'Content-Type': 'application/json', 'If-Match': if_match})


def not_matching(person_id, stale, other_person):
    """If-Match values that name no current version of `person_id`."""
    current = stale.replace('-1"', '-2"')
    return {'stale': stale, 'weak current': f'W/{current}', 'another person': other_person,
            'unknown version': tag_of(person_id, 99), 'not a tag of ours': '"abc"',
            'a huge version': tag_of(person_id, 10 ** 30), 'several, none current':
            f'{stale}, "abc", W/{current}', 'empty tag': '""'}


@pytest.mark.parametrize('case', list(not_matching(1, '"1-1"', '"2-2"')))
@pytest.mark.parametrize('method, body', WRITES)
def test_if_match_naming_no_current_version_is_412_and_changes_nothing(client, method, body,
                                                                        case):
    stale_response = post(client, ADA)
    person_id = stale_response.json['id']
    other = post(client, {**ADA, 'email': 'other@example.com'}).json['id']
    client.patch_json(f'/person/{person_id}', {'last_name': 'King'})  # now at version 2
    client.patch_json(f'/person/{other}', {'last_name': 'King'})
    if_match = not_matching(person_id, etag(stale_response), tag_of(other, 2))[case]
    before = snapshot()
    response = write(client, method, person_id, body, if_match, status=412)
    assert 'If-Match' in response.json['description']
    assert snapshot() == before


@pytest.mark.parametrize('if_match', ['current', '*', 'stale, current', 'current, W/"x"'])
@pytest.mark.parametrize('method, body', WRITES)
def test_if_match_naming_the_current_version_writes(client, method, body, if_match):
    created = post(client, ADA)
    person_id, stale = created.json['id'], etag(created)
    current = etag(client.patch_json(f'/person/{person_id}', {'last_name': 'King'}))
    header = if_match.replace('current', current).replace('stale', stale)
    response = write(client, method, person_id, body, header)
    if method == 'DELETE':
        assert response.status_int == 204
        assert Person.select().count() == 0
    else:
        assert response.status_int == 200
        assert etag(response) == tag_of(person_id, 3)
        assert Person.get_by_id(person_id).version == 3


@pytest.mark.parametrize('if_match', ['"1-1"', '*'])
@pytest.mark.parametrize('method, body', WRITES)
def test_if_match_on_an_unknown_person_is_404(client, method, body, if_match):
    assert write(client, method, 999, body, if_match, status=404).json['title']


@pytest.mark.parametrize('if_none_match, status', [
    ('current', 304), ('W/current', 304), ('"abc", current', 304), ('*', 304),
    ('stale', 200), ('"abc"', 200)])
def test_get_with_if_none_match(client, if_none_match, status):
    created = post(client, ADA)
    person_id, stale = created.json['id'], etag(created)
    current = etag(client.patch_json(f'/person/{person_id}', {'last_name': 'King'}))
    header = if_none_match.replace('current', current).replace('stale', stale)
    response = client.get(f'/person/{person_id}', headers={'If-None-Match': header},
                          status=status)
    assert etag(response) == current
    assert (response.body == b'') == (status == 304)


@pytest.fixture
def strict_client(config, courier):
    """The app with REQUIRE_IF_MATCH=1."""
    strict = dataclasses.replace(config, require_if_match=True)
    return webtest.TestApp(personapi.create_app(strict, courier))


@pytest.mark.parametrize('method, body', WRITES)
def test_require_if_match_makes_unconditional_writes_428(strict_client, method, body):
    created = post(strict_client, ADA)
    person_id = created.json['id']
    before = snapshot()
    raw = json.dumps(body).encode() if body is not None else b''
    response = send(strict_client, method, f'/person/{person_id}', raw, status=428)
    assert 'If-Match' in response.json['description']
    assert snapshot() == before
    assert write(strict_client, method, person_id, body, etag(created)).status_int in (200, 204)


# --- Idempotency-Key ------------------------------------------------------------------------

def post_with_key(client, body, key, status='*'):
    return client.post_json('/person', body, headers={'Idempotency-Key': key}, status=status)


def test_a_repeated_post_with_its_key_is_answered_again_and_creates_nothing(client):
    first = post_with_key(client, ADA, 'order-1', status=201)
    client.patch_json(first.headers['Location'], {'last_name': 'King'})  # later changes
    before = snapshot()
    again = post_with_key(client, dict(reversed(ADA.items())), 'order-1', status=201)
    assert again.body == first.body and again.json == {'id': first.json['id'], **ADA}
    assert again.headers['Location'] == first.headers['Location']
    assert etag(again) == etag(first)
    assert again.headers['Idempotent-Replayed'] == 'true'
    assert 'Idempotent-Replayed' not in first.headers
    assert snapshot() == before


@pytest.mark.parametrize('other_body', [GRACE, {**ADA, 'first_name': 'Augusta'}, {}])
def test_the_same_key_with_another_body_is_422(client, other_body):
    post_with_key(client, ADA, 'order-1', status=201)
    before = snapshot()
    response = post_with_key(client, other_body, 'order-1', status=422)
    assert 'Idempotency-Key' in response.json['description']
    assert snapshot() == before


@pytest.mark.parametrize('key', ['', 'x' * 256, 'with space', 'tab\there', 'clé', '\x7f'])
def test_a_malformed_key_is_400(client, key):
    before = snapshot()
    response = post_with_key(client, ADA, key, status=400)
    assert 'Idempotency-Key' in response.json['title'] + response.json['description']
    assert snapshot() == before


@pytest.mark.parametrize('key, another_key', [
    ('a', 'A'), ('~' * 255, '~' * 254 + '}'), ('ORDER-1', 'order-1'),
    ('7f3c1a0e-3c4b-4f8e-9f3a-0d1e2b3c4d5e', '7f3c1a0e-3c4b-4f8e-9f3a-0d1e2b3c4d5f')])
def test_keys_of_1_to_255_visible_characters_are_compared_exactly(client, key, another_key):
    first = post_with_key(client, ADA, key, status=201)
    assert post_with_key(client, ADA, key, status=201).json == first.json
    post_with_key(client, ADA, another_key, status=409)  # a new request: the address is taken


@pytest.mark.parametrize('failing_body, status', [
    ({**ADA, 'email': 'nope'}, 422), ({**ADA, 'last_name': 'Love\ud800lace'}, 422),
    ({**GRACE, 'email': ADA['email']}, 409)])
def test_failed_requests_are_not_recorded(client, failing_body, status):
    post(client, ADA)
    post_with_key(client, failing_body, 'order-1', status=status)
    assert post_with_key(client, GRACE, 'order-1', status=201).json['email'] == GRACE['email']
    assert IdempotencyKey.select().count() == 1


def test_an_expired_key_is_forgotten_and_purged(client):
    post_with_key(client, ADA, 'order-1', status=201)
    post_with_key(client, {**ADA, 'email': 'second@example.com'}, 'order-2', status=201)
    IdempotencyKey.update(created_at=IdempotencyKey.created_at - 86400 - 1).execute()
    response = post_with_key(client, GRACE, 'order-1', status=201)
    assert 'Idempotent-Replayed' not in response.headers
    assert [record.person_id for record in IdempotencyKey.select()] == [response.json['id']]


def test_deleting_the_person_erases_the_record_of_its_key(client):
    first = post_with_key(client, ADA, 'order-1', status=201)
    client.delete(first.headers['Location'], status=204)
    assert IdempotencyKey.select().count() == 0
    again = post_with_key(client, ADA, 'order-1', status=201)
    assert again.json['id'] != first.json['id']


# --- Writes together: SQLite's writer queue and group commit -------------------------------

@pytest.fixture
def sqlite_file(database_url):
    if not database_url.startswith('sqlite'):
        pytest.skip('SQLite\'s own: a database server queues and commits writers itself')
    return database_url.removeprefix('sqlite:///')


@contextlib.contextmanager
def writer_queue_held(sqlite_file):
    """Hold the processes' writer queue as another process would: flock on the lock file."""
    descriptor = os.open(f'{sqlite_file}-lock', os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def start(target):
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def committed_persons(sqlite_file):
    """What another connection sees: in WAL mode, what has been committed."""
    with contextlib.closing(sqlite3.connect(sqlite_file)) as reader:
        return reader.execute('SELECT count(*) FROM person').fetchone()[0]


def creation(n, seen, sqlite_file, fail=False):
    """A write that notes how many persons were committed when it ran in its transaction."""
    def work():
        seen.append(committed_persons(sqlite_file))
        if fail:
            raise ValueError('this write\'s own failure')
        return models.insert(Person, **person_fields(n))
    return work


def person_fields(n):
    email = f'p{n}@example.com'
    return {'first_name': f'P{n}', 'last_name': 'Group', 'email': email,
            'email_key': models.email_key(email)}


def write_all_at_once(works, sqlite_file):
    """Hand every write to the writer while another process holds the queue; release it
    when all wait. Returns each write's result or error."""
    outcomes = [None] * len(works)

    def run(i):
        try:
            outcomes[i] = models.write_together(works[i])
        except Exception as error:
            outcomes[i] = error

    with writer_queue_held(sqlite_file):
        threads = [start(lambda i=i: run(i)) for i in range(len(works))]
        time.sleep(0.5)  # all handed over: one waits for the queue, the rest behind it
        assert outcomes == [None] * len(works)  # nothing passed the held queue
    for thread in threads:
        thread.join(10)
    return outcomes


def test_writes_arriving_together_commit_in_one_transaction(sqlite_file):
    seen = []
    outcomes = write_all_at_once([creation(n, seen, sqlite_file) for n in range(20)],
                                 sqlite_file)
    assert all(isinstance(outcome, int) for outcome in outcomes)
    assert Person.select().count() == 20
    # The first write went in alone, the 19 queued behind it together: they all saw the
    # same committed state. One transaction each would have seen 0, 1, 2, ... 19.
    assert len(set(seen)) <= 2


def test_a_write_that_fails_in_a_group_fails_alone(sqlite_file):
    seen = []
    works = [creation(n, seen, sqlite_file, fail=n == 7) for n in range(12)]
    works.append(creation(3, seen, sqlite_file))  # the same address as write 3: a duplicate
    outcomes = write_all_at_once(works, sqlite_file)
    assert isinstance(outcomes[7], ValueError)
    assert sum(isinstance(outcome, peewee.IntegrityError) for outcome in outcomes) == 1
    assert sum(isinstance(outcome, int) for outcome in outcomes) == 11
    assert sorted(name for (name,) in Person.select(Person.first_name).tuples()) == sorted(
        f'P{n}' for n in range(12) if n != 7)


def test_writers_of_other_processes_wait_in_the_queue(sqlite_file):
    done = threading.Event()
    with writer_queue_held(sqlite_file):
        start(lambda: (models.write_together(creation(1, [], sqlite_file)), done.set()))
        assert not done.wait(0.5)  # SQLite's own lock is free: only the queue holds it
    assert done.wait(5)


def test_a_write_gives_up_on_a_held_queue_at_the_busy_timeout(sqlite_file, database_url):
    models.connect(f'{database_url}?timeout=1')
    with writer_queue_held(sqlite_file):  # held by this process, as /proc/locks says
        started = time.monotonic()
        with pytest.raises(models.WriterLockTimeout, match=f'process {os.getpid()} holds it'):
            models.write_together(creation(1, [], sqlite_file))
        assert 1 <= time.monotonic() - started < 5
    # The wait given up lets the lock go as soon as it gets it: the queue works on.
    assert isinstance(models.write_together(creation(2, [], sqlite_file)), int)


def hold_the_queue_in_the_child(started, release):
    with models._sqlite_writers:  # the queue alone: the parent's connection is not the child's
        started.set()
        release.wait(10)


def test_a_forked_process_queues_apart_from_its_parent(sqlite_file):
    with models.write_transaction():  # the parent has opened its queue's file, and holds it
        pass
    fork = multiprocessing.get_context('fork')
    started, release = fork.Event(), fork.Event()
    child = fork.Process(target=hold_the_queue_in_the_child, args=(started, release))
    child.start()
    try:
        assert started.wait(10)
        done = threading.Event()
        start(lambda: (models.write_together(creation(1, [], sqlite_file)), done.set()))
        assert not done.wait(0.5)  # a shared descriptor would have let both in at once
        release.set()
        assert done.wait(10)
    finally:
        release.set()
        child.join(10)


def take_the_queue_in_the_child(done):
    with models._sqlite_writers:
        done.set()


def test_a_process_forked_while_a_thread_writes_can_write_once_it_is_done(sqlite_file):
    holding, release = threading.Event(), threading.Event()

    def hold():
        with models._sqlite_writers:
            holding.set()
            release.wait(10)
    start(hold)
    assert holding.wait(5)
    fork = multiprocessing.get_context('fork')
    done = fork.Event()
    child = fork.Process(target=take_the_queue_in_the_child, args=(done,))
    child.start()
    try:
        assert not done.wait(0.5)  # the parent's thread still writes
        release.set()
        assert done.wait(10)  # a lock copied from the parent would never be let go
    finally:
        release.set()
        child.join(10)
        child.kill()


# --- Against real gunicorn ------------------------------------------------------------------

HOLD_THE_QUEUE = '''
import fcntl, os, sys
descriptor = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(descriptor, fcntl.LOCK_EX)
print('held', flush=True)
sys.stdin.read()
'''


@one_engine
def test_a_write_waits_for_a_stopped_writer_no_longer_than_the_busy_timeout(service_env,
                                                                            tmp_path):
    """A process stopped (SIGSTOP) while it holds the writers' queue: what a worker frozen
    in a write does to every other writer. Past the busy timeout, 503 and a line naming it."""
    url = service_env['DATABASE_URL'] + '?timeout=2'
    log_path = tmp_path / 'gunicorn.log'
    service = Service({**service_env, 'DATABASE_URL': url}, log_path=log_path).start()
    holder = subprocess.Popen(
        [sys.executable, '-c', HOLD_THE_QUEUE, service_env['DATABASE_URL'].removeprefix(
            'sqlite:///') + '-lock'], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == 'held\n'
        holder.send_signal(signal.SIGSTOP)
        started = time.monotonic()
        status, headers, body = service.request('POST', '/person', person(1))
        assert 2 <= time.monotonic() - started < 10
        assert (status, headers['Retry-After'], body['title']) == (503, '5',
                                                                  'Database unavailable')
        assert error_lines(log_path, f"writers' queue: process {holder.pid} holds it")
        holder.send_signal(signal.SIGCONT)
        holder.stdin.close()  # it ends, and its flock with it
        assert holder.wait(10) == 0
        assert [service.request('POST', '/person', person(n))[0] for n in (1, 2)] == [201] * 2
    finally:
        holder.kill()
        service.kill()


def test_concurrent_patches_of_one_person_lose_no_change(service):
    ids = [service.request('POST', '/person', person(n))[2]['id'] for n in range(60)]
    calls = [lambda i=i, field=field: service.request('PATCH', f'/person/{i}', {field: 'New'})
             for i in ids for field in ('first_name', 'last_name')]
    assert [status for status, _, _ in in_parallel(calls)] == [200] * 120
    lost = Person.select().where(Person.id.in_(ids), (Person.first_name != 'New') |
                                 (Person.last_name != 'New') | (Person.version != 3)).count()
    assert lost == 0


def test_concurrent_posts_with_one_key_make_one_person_and_one_mail(service, smtp):
    headers = {'Idempotency-Key': 'signup-ada'}
    results = in_parallel([lambda: service.request('POST', '/person', ADA, headers=headers)] * 10,
                          threads=10)
    assert [status for status, _, _ in results] == [201] * 10
    assert len({json.dumps(body) for _, _, body in results}) == 1
    assert sorted(reply.get('Idempotent-Replayed', '') for _, reply, _ in results) == (
        [''] + ['true'] * 9)
    assert Person.select().count() == 1
    assert smtp.wait_for(1) == 1
    time.sleep(1.5)  # a second mail would arrive now
    assert len(smtp.received()) == 1


def test_openapi_documents_the_headers_and_statuses(client):
    paths = client.get('/openapi.json').json['paths']
    item, create = paths['/person/{person_id}'], paths['/person']['post']

    def headers(operation):
        return {parameter['name'] for parameter in operation['parameters']
                if parameter['in'] == 'header'}
    assert headers(create) == {'Idempotency-Key'}
    assert set(create['responses']['201']['headers']) == {'Location', 'ETag',
                                                          'Idempotent-Replayed'}
    assert headers(item['get']) == {'If-None-Match'}
    assert {'200', '304'} <= set(item['get']['responses'])
    assert 'ETag' in item['get']['responses']['304']['headers']
    for method in ('put', 'patch', 'delete'):
        assert headers(item[method]) == {'If-Match'}
        assert {'412', '428'} <= set(item[method]['responses'])
    for method in ('put', 'patch'):
        assert 'ETag' in item[method]['responses']['200']['headers']

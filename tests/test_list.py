"""GET /person: everyone page by page and the lookup by address, in-process through WebTest.
The paging and the walk under concurrent writers run on every engine; the table of bad
queries and what the edge adds (HEAD, token, metrics, rate limit) on SQLite alone."""

import base64
import dataclasses
import json
import random
import re
import shutil
import tempfile
import threading
import urllib.parse
from pathlib import Path

import pytest
import webtest

import models
import personapi
from models import Outbox, Person, ServiceKey
from support import one_engine
from test_api import _without_request_id
from test_metrics import requests_total

ADA = {'first_name': 'Ada', 'last_name': 'Lovelace', 'email': 'ada@example.com'}
CURSOR = re.compile(r'[A-Za-z0-9_-]{32}\Z')
SHARED_MEMORY = Path('/dev/shm')


@pytest.fixture
def tmp_path(tmp_path_factory):
    """Where SQLite's file goes in this module: on tmpfs where there is one. These tests
    are about reads and their order, not durability; there a commit's fsync costs nothing,
    where a busy disk stretched the walk below from 3 s to a minute."""
    if not SHARED_MEMORY.is_dir():
        yield tmp_path_factory.mktemp('list')
        return
    folder = Path(tempfile.mkdtemp(dir=SHARED_MEMORY, prefix='personapi-list-'))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def register(client, count, prefix='p'):
    """`count` new persons; their documents as POST answered, in id order."""
    return [client.post_json('/person', {**ADA, 'email': f'{prefix}{n}@example.com'}).json
            for n in range(count)]


def walk(client, path='/person'):
    """Every page from `path` on, following `next`: the responses."""
    pages = []
    while path is not None:
        pages.append(client.get(path))
        path = pages[-1].json['next']
    return pages


def cursor_of(path):
    return urllib.parse.parse_qs(urllib.parse.urlsplit(path).query)['cursor'][0]


def snapshot():
    return (sorted(Person.select().tuples()), Outbox.select().count(),
            sorted(ServiceKey.select().tuples()))


# --- Paging and lookup, on every engine -----------------------------------------------------

def test_an_empty_database_is_one_empty_last_page(client):
    response = client.get('/person')
    assert response.json == {'items': [], 'next': None, 'limit': 20}
    assert response.content_type == 'application/json' and 'Link' not in response.headers


def test_following_next_lists_everyone_once_in_id_order_with_a_link_to_each_next_page(client):
    persons = register(client, 7)
    pages = walk(client, '/person?limit=3')
    assert [len(page.json['items']) for page in pages] == [3, 3, 1]
    assert [item for page in pages for item in page.json['items']] == persons
    for page in pages:
        assert page.json['limit'] == 3
        nxt = page.json['next']
        if nxt is None:
            assert 'Link' not in page.headers
        else:
            assert page.headers['Link'] == f'<{nxt}>; rel="next"'
            assert nxt.startswith('/person?limit=3&cursor=') and CURSOR.match(cursor_of(nxt))


def test_the_default_page_is_20_and_next_keeps_the_query_without_a_limit(client):
    persons = register(client, 21)
    first = client.get('/person').json
    assert (first['items'], first['limit']) == (persons[:20], 20)
    assert first['next'].startswith('/person?cursor=')
    assert client.get(first['next']).json == {'items': persons[20:], 'next': None, 'limit': 20}


def test_a_page_that_ends_the_table_exactly_has_no_next(client):
    persons = register(client, 4)
    assert client.get('/person?limit=4').json == {'items': persons, 'next': None, 'limit': 4}
    assert client.get('/person?limit=100').json['items'] == persons


def test_cursors_hold_across_processes_and_after_the_person_they_name_is_gone(config, courier,
                                                                              client):
    persons = register(client, 5)
    cursor = cursor_of(client.get('/person?limit=2').json['next'])
    client.delete(f'/person/{persons[1]["id"]}', status=204)  # the last of the first page
    # A new app reads its key afresh from the database, as another worker, replica or a
    # restarted service does.
    other = webtest.TestApp(personapi.create_app(config, courier))
    page = other.get(f'/person?limit=2&cursor={cursor}').json
    assert page['items'] == persons[2:4]
    assert client.get(page['next']).json['items'] == persons[4:]


KING = 'Ada.King@Example.ORG'


@pytest.mark.parametrize('registered, asked', [
    (KING, 'ada.king@example.org'), (KING, 'ADA.KING@EXAMPLE.ORG'), (KING, KING),
    (KING, 'ada.KING@example.org'), ('josé@Exämple.com', 'JOSÉ@EXÄMPLE.COM'),
    ('用户@例子.广告', '用户@例子.广告')])
def test_email_finds_the_person_whatever_the_case_of_the_address(client, registered, asked):
    register(client, 2)
    ada = client.post_json('/person', {**ADA, 'email': registered}).json
    register(client, 2, prefix='q')
    response = client.get('/person?' + urllib.parse.urlencode({'email': asked}))
    assert response.json == {'items': [ada], 'next': None, 'limit': 20}
    assert 'Link' not in response.headers


@pytest.mark.parametrize('asked', ['nobody@example.com', 'jose@example.com',
                                   'ada@example.co', 'ada@example.com.'])
def test_email_finds_no_one_for_another_address(client, asked):
    client.post_json('/person', {**ADA, 'email': 'josé@example.com'})
    client.post_json('/person', ADA)
    response = client.get('/person?' + urllib.parse.urlencode({'email': asked}), status='*')
    if response.status_int == 200:
        assert response.json == {'items': [], 'next': None, 'limit': 20}
    else:  # an address email-validator refuses
        assert response.status_int == 400 and response.json['description'].startswith('email: ')


def test_email_with_limit_answers_the_limit_given(client):
    ada = client.post_json('/person', ADA).json
    assert client.get('/person?email=ada%40example.com&limit=1').json == {
        'items': [ada], 'next': None, 'limit': 1}


WRITERS = 3
WRITES_PER_PAGE = 2


def test_a_walk_while_others_create_and_delete_sees_every_lasting_person_once(client):
    """Writers create and delete people while each page is read, WRITES_PER_PAGE of them
    by the time the next page is asked for; whoever existed from the walk's start to its
    end is seen exactly once. (The writes are counted out: unbounded, a run's DELETEs each
    waited on the erasure's checkpoint and stretched the walk tenfold.)"""
    addresses = [f'i{n}@example.com' for n in range(40)]
    with models.write_transaction():  # one commit for all, not an fsync for each
        initial = [models.insert(Person, first_name='Ada', last_name='Lovelace', email=address,
                                 email_key=models.email_key(address)) for address in addresses]
    alive, created, deleted, failures = set(initial), set(), set(), []
    turn, stop = threading.Condition(), threading.Event()
    allowed, started, done = [0], [0], [0]

    def write(seed):
        rng = random.Random(seed)
        number = 0
        while True:
            with turn:
                turn.wait_for(lambda: stop.is_set() or started[0] < allowed[0])
                if stop.is_set():
                    return
                started[0] += 1
                victim = rng.choice(sorted(alive)) if alive and rng.random() < 0.5 else None
                alive.discard(victim)
            try:
                if victim:
                    client.delete(f'/person/{victim}', status=204)
                else:
                    number += 1
                    body = {**ADA, 'email': f'w{seed}-{number}@example.com'}
                    person_id = client.post_json('/person', body, status=201).json['id']
            except Exception as error:  # noqa: BLE001 - reported by the test below
                failures.append(error)
            with turn:
                if victim:
                    deleted.add(victim)
                elif not failures:
                    created.add(person_id)
                    alive.add(person_id)
                done[0] += 1
                turn.notify_all()

    threads = [threading.Thread(target=write, args=(seed,)) for seed in range(WRITERS)]
    for thread in threads:
        thread.start()
    seen, path, pages = [], '/person?limit=4', 0
    try:
        while path is not None:
            with turn:
                allowed[0] += WRITES_PER_PAGE
                turn.notify_all()
            page = client.get(path).json  # while those writes run
            seen += [item['id'] for item in page['items']]
            path, pages = page['next'], pages + 1
            with turn:
                assert turn.wait_for(lambda: failures or done[0] >= allowed[0], timeout=20)
            assert not failures, failures
    finally:
        with turn:
            stop.set()
            turn.notify_all()
        for thread in threads:
            thread.join(30)
    assert seen == sorted(set(seen)), 'ids must strictly increase: none twice, none back'
    lasting = set(initial) - deleted
    assert lasting <= set(seen), f'missed {sorted(lasting - set(seen))}'
    assert set(seen) <= set(initial) | created
    assert deleted & set(initial) and created, 'the writers must have deleted and created'
    assert pages > 10


# --- The SQL: a range of an index, never an OFFSET --------------------------------------

@one_engine  # the SQL is built once for every engine; SQLite's plan shows its shape
def test_a_page_is_a_range_of_the_primary_key_and_a_lookup_uses_the_unique_index(client):
    register(client, 3)
    plans = {}
    for name, query in [('page', lambda: models.persons_after(1, 2)),
                        ('lookup', lambda: models.persons_with_email('ADA@example.com'))]:
        query()
        sql = models._statements[f'persons_{"after" if name == "page" else "with_email"}']
        assert 'OFFSET' not in sql.upper()
        plans[name] = ' '.join(row[-1] for row in models.db.execute_sql(
            'EXPLAIN QUERY PLAN ' + sql, (1, 2) if name == 'page' else ('x',)).fetchall())
    assert 'USING INTEGER PRIMARY KEY (rowid>?)' in plans['page']
    assert 'TEMP B-TREE' not in plans['page']  # read in index order, never sorted
    assert 'USING INDEX person_email_key (email_key=?)' in plans['lookup']


# --- Bad queries: 400 naming the parameter, nothing changed ---------------------------------

BAD_QUERIES = [  # (query string, the parameter named)
    ('limit=0', 'limit'), ('limit=101', 'limit'), ('limit=abc', 'limit'),
    ('limit=1&limit=2', 'limit'), ('limit=5&limit=5', 'limit'), ('limit=', 'limit'),
    ('limit', 'limit'), ('limit=-1', 'limit'), ('limit=%2B5', 'limit'), ('limit=05', 'limit'),
    ('limit=5.0', 'limit'), ('limit=1e1', 'limit'), ('limit=0x10', 'limit'),
    ('limit=1_0', 'limit'), ('limit=+5', 'limit'), ('limit=%205', 'limit'),
    ('limit=5%00', 'limit'), ('limit=%EF%BC%95', 'limit'), ('limit=%D9%A5', 'limit'),
    ('limit=%ZZ', 'limit'), ('limit=' + '9' * 400, 'limit'), ('limit=1,2', 'limit'),
    ('cursor=', 'cursor'), ('cursor', 'cursor'), ('cursor=1', 'cursor'),
    ('cursor=%ZZ', 'cursor'), ('cursor=' + 'A' * 32, 'cursor'), ('cursor=' + 'A' * 4000, 'cursor'),
    ('cursor=' + base64.urlsafe_b64encode(b'{"id": 1, "after": 1}').decode(), 'cursor'),
    ('email=', 'email'), ('email', 'email'), ('email=nope', 'email'), ('email=ada%40', 'email'),
    ('email=%40example.com', 'email'), ('email=ada%40example', 'email'),
    ('email=ada+tag%40example.com', 'email'),  # a + in a query is a space
    ('email=%20ada%40example.com', 'email'), ('email=ada%40example.com%0D%0ABcc:x', 'email'),
    ('email=' + 'x' * 250 + '%40example.com', 'email'), ('email=%FF%FE', 'email'),
    ('email==%3Futf-8%3Fq%3Fada%3F%3D%40example.com', 'email'),
    ('email=ada%40example.com&email=ada%40example.com', 'email'),
    ('foo=1', 'foo'), ('LIMIT=5', 'LIMIT'), ('limit%5B%5D=5', 'limit[]'), ('page=2', 'page'),
    ('offset=10', 'offset'), ('%00=1', '\x00'), ('=1', '(no name)'), ('sort=id', 'sort'),
    ('limit=5&foo=1', 'foo'), ('email=ada%40example.com&extra=', 'extra'),
]


@pytest.fixture
def persons(client):
    return register(client, 3)


@one_engine
def test_every_bad_query_is_400_naming_its_parameter_and_changes_nothing(client, persons):
    before = snapshot()
    answers = {query: client.get(f'/person?{query}', status='*') for query, _ in BAD_QUERIES}
    wrong = {query: (answers[query].status, answers[query].text)
             for query, parameter in BAD_QUERIES
             if not (answers[query].status_int == 400
                     and answers[query].content_type == 'application/json'
                     and answers[query].json['title'] == 'Invalid query parameter'
                     and answers[query].json['description'].startswith(f'{parameter}: '))}
    assert not wrong
    assert snapshot() == before


@one_engine
def test_a_cursor_with_email_is_400_naming_the_cursor(client, persons):
    cursor = cursor_of(client.get('/person?limit=1').json['next'])
    response = client.get(f'/person?email=ada%40example.com&cursor={cursor}', status=400)
    assert response.json['description'].startswith('cursor: ')


def variants(cursor):
    """Every cursor one change away from `cursor`: each character replaced, each length cut
    short, a character added."""
    alphabet = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_'
    changed = [cursor[:n] + alphabet[(alphabet.index(char) + 1) % 64] + cursor[n + 1:]
               for n, char in enumerate(cursor)]
    return changed + [cursor[:n] for n in range(1, len(cursor))] + [cursor + 'A', cursor + '=']


@one_engine
def test_only_a_cursor_the_service_made_is_read(client, persons):
    made = cursor_of(client.get('/person?limit=1').json['next'])
    before = snapshot()
    forged = variants(made) + [
        personapi.Cursors(key=b'another database' * 2).make(persons[0]['id']),
        personapi.Cursors(key=b'another database' * 2).make(0),
        base64.urlsafe_b64encode(persons[0]['id'].to_bytes(8, 'big') + bytes(16)).decode(),
        made.swapcase(), made[::-1]]
    statuses = {cursor: client.get(f'/person?cursor={urllib.parse.quote(cursor)}',
                                   status='*').status_int for cursor in forged}
    assert set(statuses.values()) == {400}, [c for c, status in statuses.items() if status != 400]
    assert snapshot() == before
    assert client.get(f'/person?cursor={made}').json['items'] == persons[1:]


@pytest.mark.parametrize('text', ['', 'plain', 'quote " backslash \\ slash /', 'line\nbreak',
                                  '\x00\x1f\x7f', '\u2028\u2029', 'ünï 用户 🙂', '\ud800'])
def test_the_page_document_is_the_json_the_encoder_would_write(text):
    rows = [(1, text, 'Lovelace', 'ada@example.com'), (2, 'Grace', text, text)]
    documents = [dict(zip(['id', 'first_name', 'last_name', 'email'], row)) for row in rows]
    for next_path in (None, '/person?limit=2&cursor=' + 'A' * 32):
        page = personapi.page_json(rows, next_path, 2)
        assert page == personapi.encode_json({'items': documents, 'next': next_path, 'limit': 2})
        assert json.loads(page)['items'] == documents
    assert personapi.page_json([], None, 20) == '{"items": [], "next": null, "limit": 20}'


@one_engine
def test_the_document_describes_the_list_and_its_examples_are_a_real_request_and_answer(client):
    document = client.get('/openapi.json').json
    operation = document['paths']['/person']['get']
    parameters = {parameter['name']: parameter for parameter in operation['parameters']}
    assert set(parameters) == {'limit', 'cursor', 'email'}
    assert all(parameter['in'] == 'query' for parameter in parameters.values())
    assert set(operation['responses']) == {'200', '400', '401', '414', '503'}
    assert 'Link' in operation['responses']['200']['headers']
    client.post_json('/person', ADA)  # the example person
    query = {name: parameter['example'] for name, parameter in parameters.items()
             if 'example' in parameter}
    page = client.get('/person?' + urllib.parse.urlencode(query)).json
    assert page == document['components']['schemas']['PersonPage']['example']


# --- What the edge adds: HEAD, token, metrics, rate limit -----------------------------------

@one_engine
@pytest.mark.parametrize('path, status', [('/person?limit=2', 200), ('/person', 200),
                                          ('/person?email=p1%40example.com', 200),
                                          ('/person?limit=0', 400)])
def test_head_answers_as_get_does_without_a_body(client, persons, path, status):
    get, head = client.get(path, status=status), client.head(path, status=status)
    assert head.body == b''
    assert head.headers['Content-Length'] == str(len(get.body))
    assert _without_request_id(head.headers) == _without_request_id(get.headers)


def app_with(config, courier, **changes):
    return webtest.TestApp(personapi.create_app(dataclasses.replace(config, **changes), courier))


@one_engine
def test_the_list_needs_the_token_when_one_is_set(config, courier, persons):
    guarded = app_with(config, courier, api_token='s3cret-token')
    for path in ('/person', '/person?email=p0%40example.com', '/person?limit=0'):
        response = guarded.get(path, status=401)
        assert response.headers['WWW-Authenticate'] == 'Bearer'
    page = guarded.get('/person', headers={'Authorization': 'Bearer s3cret-token'}).json
    assert page['items'] == persons


@one_engine
def test_reads_are_not_rate_limited(config, courier, persons):
    limited = app_with(config, courier, rate_limit='2/minute')
    address = {'REMOTE_ADDR': '192.0.2.9'}
    for _ in range(2):
        limited.delete(f'/person/{persons.pop()["id"]}', extra_environ=address, status=204)
    limited.delete(f'/person/{persons[0]["id"]}', extra_environ=address, status=429)
    for _ in range(10):
        assert limited.get('/person', extra_environ=address).json['items'] == persons


@one_engine
@pytest.mark.parametrize('query, status', [('', 200), ('?limit=0', 400),
                                           ('?email=ada%40example.com', 200)])
def test_the_list_counts_on_the_route_person_never_its_query(client, query, status):
    labels = {'method': 'GET', 'route': '/person', 'status': str(status)}
    before = requests_total(client.get('/metrics').text, **labels)
    client.get(f'/person{query}', status=status)
    after = client.get('/metrics').text
    assert requests_total(after, **labels) - before == 1
    assert 'example.com' not in after and 'limit=' not in after

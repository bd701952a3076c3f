"""The ceiling: the service's GET and POST as a bare WSGI callable over stdlib sqlite3.

No framework, no ORM, no validation, no outbox, no mail: what gunicorn, Python and SQLite
allow on this machine. Same `person` table, same PRAGMAs and durability (WAL,
synchronous=FULL), same busy timeout and BEGIN IMMEDIATE, and one connection per worker
thread, opened on its first request (so after the fork), kept open like the service's.
`make bench` serves it as `bench.ceiling:app` with bench/gunicorn_ceiling.conf.py.
"""

import json
import os
import sqlite3
import threading

DATABASE = os.environ['DATABASE_URL'].removeprefix('sqlite:///')
PRAGMAS = ('PRAGMA journal_mode=wal', 'PRAGMA synchronous=full', 'PRAGMA foreign_keys=1')
JSON_HEADERS = [('Content-Type', 'application/json')]

_local = threading.local()


def _connection():
    connection = getattr(_local, 'connection', None)
    if connection is None:
        # isolation_level=None: the transactions below are spelled out, as the service's are.
        connection = sqlite3.connect(DATABASE, timeout=15, isolation_level=None)
        for pragma in PRAGMAS:
            connection.execute(pragma)
        _local.connection = connection
    return connection


def _respond(start_response, status, document, headers=()):
    body = json.dumps(document).encode()
    start_response(status, [*JSON_HEADERS, *headers, ('Content-Length', str(len(body)))])
    return [body]


def get_person(start_response, person_id):
    row = _connection().execute('SELECT id, email FROM person WHERE id = ?',
                                (person_id,)).fetchone()
    if row is None:
        return _respond(start_response, '404 Not Found', {'title': '404 Not Found'})
    return _respond(start_response, '200 OK', {'id': row[0], 'email': row[1]})


def create_person(environ, start_response):
    body = json.loads(environ['wsgi.input'].read(int(environ.get('CONTENT_LENGTH') or 0)))
    first_name, last_name, email = body['first_name'], body['last_name'], body['email']
    connection = _connection()
    connection.execute('BEGIN IMMEDIATE')
    try:
        person_id = connection.execute(
            'INSERT INTO person (first_name, last_name, email, email_key) VALUES (?, ?, ?, ?)',
            (first_name, last_name, email, email.lower())).lastrowid
        connection.execute('COMMIT')
    except BaseException:
        connection.execute('ROLLBACK')
        raise
    document = {'id': person_id, 'first_name': first_name, 'last_name': last_name,
                'email': email}
    return _respond(start_response, '201 Created', document,
                    [('Location', f'/person/{person_id}')])


def app(environ, start_response):
    method, path = environ['REQUEST_METHOD'], environ['PATH_INFO']
    if method == 'GET' and path.startswith('/person/') and path[8:].isdigit():
        return get_person(start_response, int(path[8:]))
    if method == 'POST' and path == '/person':
        return create_person(environ, start_response)
    return _respond(start_response, '404 Not Found', {'title': '404 Not Found'})

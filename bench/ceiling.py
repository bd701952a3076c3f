"""The ceilings: the service's GET, list and POST as bare WSGI callables over the database's
own driver (stdlib sqlite3, psycopg2 or PyMySQL, as DATABASE_URL says).

`app`, the bare ceiling: no framework, no ORM, no validation, no outbox, no mail: what
gunicorn, Python and the database allow on this machine. Its list (`GET /person?cursor=<id>`,
pages of 20) runs the service's keyset query and puts the page together as the service
does; its cursor is the bare id, with no signature to make or check. Same `person` table, one
connection per worker thread, opened on its first request (so after the fork) and kept
open. On SQLite, the service's PRAGMAs and durability (WAL, synchronous=FULL), busy timeout
and BEGIN IMMEDIATE; on a server, its defaults (a commit waits for its log on disk).

`mail_app`, the mail ceiling: the same, and the welcome mail as a minimal outbox: a row in
the service's `outbox` table (naming the person) written in the person's transaction, and
one sender thread per worker that claims the due rows with their person's address and
names, sends each as bytes from a fixed template with `smtplib.sendmail` on an SMTP session
kept open, and deletes the batch's rows in one DELETE. On SQLite the claim is one
UPDATE ... RETURNING; MariaDB has no UPDATE ... RETURNING, so on a server it is the
service's three statements (pick the due ids, claim them in one conditional UPDATE, read
them back with their persons).

`make bench` serves both with bench/gunicorn_stock.conf.py (gunicorn as it ships) and
with bench/gunicorn_ceiling.conf.py (the service's own settings).
"""

import contextlib
import email.utils
import itertools
import json
import logging
import os
import smtplib
import threading
import time

from playhouse.db_url import parse

from models import SQLITE_OPTIONS

DATABASE_URL = os.environ['DATABASE_URL']
ENGINE = DATABASE_URL.split(':', 1)[0].split('+', 1)[0]  # sqlite, postgresql or mysql
JSON_HEADERS = [('Content-Type', 'application/json')]

SMTP_HOST = os.environ.get('SMTP_HOST', 'localhost')
SMTP_PORT = int(os.environ.get('SMTP_PORT', '1025'))
MAIL_FROM = 'no-reply@personapi.local'
MAIL_APP = 'bench.ceiling:mail_app'
BATCH_SIZE = 100
LEASE_SECONDS = 60.0  # a claimed row not marked sent by then is claimed again
POLL_SECONDS = 1.0
# The service's welcome mail, byte for byte but for the encoding machinery.
MESSAGE = ('From: Person API <' + MAIL_FROM + '>\r\n'
           'To: {recipient}\r\n'
           'Subject: Welcome, {name}!\r\n'
           'Date: {date}\r\n'
           'Message-ID: <{row_id}.{stamp}@personapi.local>\r\n'
           'MIME-Version: 1.0\r\n'
           'Content-Type: text/plain; charset="utf-8"\r\n'
           'Content-Transfer-Encoding: 8bit\r\n'
           '\r\n'
           'Hello {name},\r\n'
           '\r\n'
           'you are now registered with the Person API.\r\n')
SELECT_PERSON = 'SELECT id, email FROM person WHERE id = ?'
PAGE = 20
LIST_PERSONS = ('SELECT id, first_name, last_name, email FROM person WHERE id > ? '
                'ORDER BY id LIMIT ?')
INSERT_PERSON = 'INSERT INTO person (first_name, last_name, email, email_key) VALUES (?, ?, ?, ?)'
INSERT_OUTBOX = ("INSERT INTO outbox (person_id, status, created_at, due_at, attempts, claim,"
                 " last_error) VALUES (?, 'pending', ?, ?, 0, '', '')")
CLAIM_RETURNING = (
    "UPDATE outbox SET claim = ?, due_at = ?, attempts = attempts + 1 WHERE id IN "
    "(SELECT id FROM outbox WHERE status = 'pending' AND due_at <= ? ORDER BY due_at LIMIT ?) "
    "RETURNING id, (SELECT email FROM person WHERE person.id = person_id), "
    "(SELECT first_name || ' ' || last_name FROM person WHERE person.id = person_id)")
DUE = "SELECT id FROM outbox WHERE status = 'pending' AND due_at <= ? ORDER BY due_at LIMIT ?"
CLAIM = ("UPDATE outbox SET claim = ?, due_at = ?, attempts = attempts + 1 "
         "WHERE id IN ({ids}) AND status = 'pending' AND due_at <= ?")
CLAIMED = ("SELECT outbox.id, person.email, person.first_name, person.last_name FROM outbox "
           "JOIN person ON person.id = outbox.person_id WHERE outbox.claim = ?")
DELETE_SENT = 'DELETE FROM outbox WHERE id IN ({ids})'

_string = json.encoder.encode_basestring  # a str in JSON, as the service writes it
log = logging.getLogger('ceiling')
_local = threading.local()


class Sqlite:
    """stdlib sqlite3 with the service's PRAGMAs and busy timeout; `?` parameters."""

    def __init__(self, synchronous='full'):
        import sqlite3

        self.errors = (sqlite3.Error,)
        # isolation_level=None: the transactions below are spelled out, as the service's are.
        self.connection = sqlite3.connect(DATABASE_URL.removeprefix('sqlite:///'),
                                          timeout=SQLITE_OPTIONS['timeout'],
                                          isolation_level=None)
        for name, value in {**SQLITE_OPTIONS['pragmas'], 'synchronous': synchronous}.items():
            self.connection.execute(f'PRAGMA {name}={value}')
        self.begin = 'BEGIN IMMEDIATE'

    def execute(self, sql, parameters=()):
        return self.connection.execute(sql, parameters)

    def insert(self, sql, parameters):
        return self.execute(sql, parameters).lastrowid


class Server:
    """psycopg2 or PyMySQL in autocommit mode, transactions spelled out; `?` become `%s`."""

    def __init__(self, synchronous=None):
        settings = parse(DATABASE_URL)
        if ENGINE == 'postgresql':
            import psycopg2

            self.errors = (psycopg2.Error,)
            self.connection = psycopg2.connect(**settings)
            self.connection.autocommit = True
            self.returning_id = ' RETURNING id'
        else:
            import pymysql

            self.errors = (pymysql.Error,)
            self.connection = pymysql.connect(autocommit=True, **settings)
            self.returning_id = ''
        self.cursor = self.connection.cursor()
        self.begin = 'BEGIN'

    def execute(self, sql, parameters=()):
        self.cursor.execute(sql.replace('?', '%s'), parameters)
        return self.cursor

    def insert(self, sql, parameters):
        cursor = self.execute(sql + self.returning_id, parameters)
        return cursor.fetchone()[0] if self.returning_id else cursor.lastrowid


Database = Sqlite if ENGINE == 'sqlite' else Server


def _connection():
    connection = getattr(_local, 'connection', None)
    if connection is None:
        connection = _local.connection = Database()
    return connection


@contextlib.contextmanager
def _transaction(connection):
    connection.execute(connection.begin)
    try:
        yield connection
        connection.execute('COMMIT')
    except BaseException:
        connection.execute('ROLLBACK')
        raise


def _respond(start_response, status, document, headers=()):
    body = json.dumps(document).encode()
    start_response(status, [*JSON_HEADERS, *headers, ('Content-Length', str(len(body)))])
    return [body]


def get_person(start_response, person_id):
    row = _connection().execute(SELECT_PERSON, (person_id,)).fetchone()
    if row is None:
        return _respond(start_response, '404 Not Found', {'title': '404 Not Found'})
    return _respond(start_response, '200 OK', {'id': row[0], 'email': row[1]})


def list_persons(environ, start_response):
    """A page of PAGE persons after the id `cursor=<id>` (the whole query), put together as
    the service puts its page together: json.dumps of 20 dicts costs more than the rest."""
    query = environ.get('QUERY_STRING', '')
    after = int(query[7:]) if query.startswith('cursor=') else 0
    rows = _connection().execute(LIST_PERSONS, (after, PAGE + 1)).fetchall()
    items = ', '.join([f'{{"id": {row[0]}, "first_name": {_string(row[1])}, '
                       f'"last_name": {_string(row[2])}, "email": {_string(row[3])}}}'
                       for row in rows[:PAGE]])
    headers, next_json = [*JSON_HEADERS], 'null'
    if len(rows) > PAGE:
        next_path = f'/person?cursor={rows[PAGE - 1][0]}'
        next_json = f'"{next_path}"'
        headers.append(('Link', f'<{next_path}>; rel="next"'))
    body = f'{{"items": [{items}], "next": {next_json}, "limit": {PAGE}}}'.encode()
    start_response('200 OK', [*headers, ('Content-Length', str(len(body)))])
    return [body]


def create_person(environ, start_response, *, queue_mail=False):
    body = json.loads(environ['wsgi.input'].read(int(environ.get('CONTENT_LENGTH') or 0)))
    first_name, last_name, email = body['first_name'], body['last_name'], body['email']
    with _transaction(_connection()) as connection:
        person_id = connection.insert(INSERT_PERSON,
                                      (first_name, last_name, email, email.lower()))
        if queue_mail:
            now = time.time()
            connection.execute(INSERT_OUTBOX, (person_id, now, now))
    if queue_mail:
        sender.wake.set()
    document = {'id': person_id, 'first_name': first_name, 'last_name': last_name,
                'email': email}
    return _respond(start_response, '201 Created', document,
                    [('Location', f'/person/{person_id}')])


def _route(environ, start_response, queue_mail):
    method, path = environ['REQUEST_METHOD'], environ['PATH_INFO']
    if method == 'GET' and path.startswith('/person/') and path[8:].isdigit():
        return get_person(start_response, int(path[8:]))
    if method == 'GET' and path == '/person':
        return list_persons(environ, start_response)
    if method == 'POST' and path == '/person':
        return create_person(environ, start_response, queue_mail=queue_mail)
    return _respond(start_response, '404 Not Found', {'title': '404 Not Found'})


def app(environ, start_response):
    return _route(environ, start_response, queue_mail=False)


def mail_app(environ, start_response):
    return _route(environ, start_response, queue_mail=True)


class Sender:
    """The mail ceiling's one sender thread per worker: woken after each commit."""

    def __init__(self):
        self.wake = threading.Event()
        self.batches = itertools.count()
        self.smtp = None

    def start(self):
        """Call it in each worker, after the fork."""
        threading.Thread(target=self._run, name='ceiling-sender', daemon=True).start()

    def _run(self):
        # Deleting sent rows needs no fsync (the service's courier does the same).
        connection = Database(synchronous='normal')
        while True:
            self.wake.wait(POLL_SECONDS)
            self.wake.clear()  # before the claim: a commit after it wakes the next round
            try:
                while self.deliver(connection) == BATCH_SIZE:
                    pass
            except (OSError, smtplib.SMTPException, *connection.errors):
                log.exception('mail round failed; the lease gives the rows back')
                self._close()

    def claim(self, connection):
        """Lease up to BATCH_SIZE due rows: [(row id, address, name)]."""
        now, claim = time.time(), f'{os.getpid()}-{next(self.batches)}'
        if ENGINE == 'sqlite':
            with _transaction(connection):
                return connection.execute(
                    CLAIM_RETURNING, (claim, now + LEASE_SECONDS, now, BATCH_SIZE)).fetchall()
        due = [row_id for (row_id,) in connection.execute(DUE, (now, BATCH_SIZE)).fetchall()]
        if not due:
            return []
        with _transaction(connection):
            connection.execute(CLAIM.format(ids=', '.join('?' * len(due))),
                               (claim, now + LEASE_SECONDS, *due, now))
        return [(row_id, address, f'{first} {last}') for row_id, address, first, last
                in connection.execute(CLAIMED, (claim,)).fetchall()]

    def deliver(self, connection):
        """Claim, send and delete one batch; returns its size."""
        rows = self.claim(connection)
        if rows:
            if self.smtp is None:
                self.smtp = smtplib.SMTP(SMTP_HOST, SMTP_PORT, timeout=10)
            date, stamp = email.utils.formatdate(), int(time.time())
            for row_id, recipient, name in rows:
                message = MESSAGE.format(recipient=recipient, name=name, date=date,
                                         row_id=row_id, stamp=stamp)
                self.smtp.sendmail(MAIL_FROM, [recipient], message.encode())
            with _transaction(connection):
                connection.execute(DELETE_SENT.format(ids=', '.join('?' * len(rows))),
                                   [row[0] for row in rows])
        return len(rows)

    def _close(self):
        if self.smtp is not None:
            try:
                self.smtp.close()
            finally:
                self.smtp = None


sender = Sender()


def start_sender(app_uri):
    """In each worker, after the fork: the mail ceiling's sender (the bare one has none)."""
    if app_uri == MAIL_APP:
        sender.start()

"""The ceilings: the service's GET and POST as bare WSGI callables over stdlib sqlite3.

`app`, the bare ceiling: no framework, no ORM, no validation, no outbox, no mail: what
gunicorn, Python and SQLite allow on this machine. Same `person` table, same PRAGMAs and
durability (WAL, synchronous=FULL), same busy timeout and BEGIN IMMEDIATE, and one
connection per worker thread, opened on its first request (so after the fork), kept open
like the service's.

`mail_app`, the mail ceiling: the same, and the welcome mail as a minimal outbox: a row in
the service's `outbox` table (naming the person) written in the person's transaction, and
one sender thread per worker that claims the due rows with their person's address and names
in one UPDATE, sends each as bytes from a fixed template with `smtplib.sendmail` on an SMTP
session kept open, and deletes the batch's rows in one DELETE (without an fsync, as the
service's courier).

`make bench` serves both with bench/gunicorn_ceiling.conf.py.
"""

import contextlib
import email.utils
import itertools
import json
import logging
import os
import smtplib
import sqlite3
import threading
import time

from models import SQLITE_OPTIONS

DATABASE = os.environ['DATABASE_URL'].removeprefix('sqlite:///')
JSON_HEADERS = [('Content-Type', 'application/json')]

SMTP_HOST = os.environ.get('SMTP_HOST', 'localhost')
SMTP_PORT = int(os.environ.get('SMTP_PORT', '1025'))
MAIL_FROM = 'no-reply@personapi.local'
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
INSERT_PERSON = 'INSERT INTO person (first_name, last_name, email, email_key) VALUES (?, ?, ?, ?)'
INSERT_OUTBOX = ("INSERT INTO outbox (person_id, status, created_at, due_at, attempts, claim,"
                 " last_error) VALUES (?, 'pending', ?, ?, 0, '', '')")
CLAIM = ("UPDATE outbox SET claim = ?, due_at = ?, attempts = attempts + 1 WHERE id IN "
         "(SELECT id FROM outbox WHERE status = 'pending' AND due_at <= ? ORDER BY due_at LIMIT ?) "
         "RETURNING id, (SELECT email FROM person WHERE person.id = person_id), "
         "(SELECT first_name || ' ' || last_name FROM person WHERE person.id = person_id)")
DELETE_SENT = 'DELETE FROM outbox WHERE id IN (SELECT value FROM json_each(?))'

log = logging.getLogger('ceiling')
_local = threading.local()


def _connect(synchronous='full'):
    """A connection with the service's PRAGMAs and busy timeout."""
    # isolation_level=None: the transactions below are spelled out, as the service's are.
    connection = sqlite3.connect(DATABASE, timeout=SQLITE_OPTIONS['timeout'],
                                 isolation_level=None)
    for name, value in {**SQLITE_OPTIONS['pragmas'], 'synchronous': synchronous}.items():
        connection.execute(f'PRAGMA {name}={value}')
    return connection


def _connection():
    connection = getattr(_local, 'connection', None)
    if connection is None:
        connection = _local.connection = _connect()
    return connection


@contextlib.contextmanager
def _transaction(connection):
    connection.execute('BEGIN IMMEDIATE')
    try:
        yield connection
        connection.execute('COMMIT')
    except BaseException:
        connection.execute('ROLLBACK')
        raise


def _write(connection, statement, parameters):
    """Run `statement` in a transaction of its own; returns the rows it returns."""
    with _transaction(connection):
        return connection.execute(statement, parameters).fetchall()


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


def create_person(environ, start_response, *, queue_mail=False):
    body = json.loads(environ['wsgi.input'].read(int(environ.get('CONTENT_LENGTH') or 0)))
    first_name, last_name, email = body['first_name'], body['last_name'], body['email']
    with _transaction(_connection()) as connection:
        person_id = connection.execute(
            INSERT_PERSON, (first_name, last_name, email, email.lower())).lastrowid
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
        connection = _connect(synchronous='normal')
        while True:
            self.wake.wait(POLL_SECONDS)
            self.wake.clear()  # before the claim: a commit after it wakes the next round
            try:
                while self.deliver(connection) == BATCH_SIZE:
                    pass
            except (OSError, smtplib.SMTPException, sqlite3.Error):
                log.exception('mail round failed; the lease gives the rows back')
                self._close()

    def deliver(self, connection):
        """Claim, send and delete one batch; returns its size."""
        now, claim = time.time(), f'{os.getpid()}-{next(self.batches)}'
        rows = _write(connection, CLAIM, (claim, now + LEASE_SECONDS, now, BATCH_SIZE))
        if rows:
            if self.smtp is None:
                self.smtp = smtplib.SMTP(SMTP_HOST, SMTP_PORT, timeout=10)
            date = email.utils.formatdate()
            for row_id, recipient, name in rows:
                message = MESSAGE.format(recipient=recipient, name=name, date=date,
                                         row_id=row_id, stamp=int(now))
                self.smtp.sendmail(MAIL_FROM, [recipient], message.encode())
            _write(connection, DELETE_SENT, (json.dumps([row[0] for row in rows]),))
        return len(rows)

    def _close(self):
        if self.smtp is not None:
            try:
                self.smtp.close()
            finally:
                self.smtp = None


sender = Sender()

"""Storage: the Person and Outbox models, bound at start-up to DATABASE_URL.

`python models.py init` creates the schema by hand; gunicorn's master does it before forking.
"""

import contextlib
import hashlib
import os
import sys
import threading
import time

import peewee
from playhouse import db_url

db = peewee.DatabaseProxy()

MAX_NAME_LENGTH = 100
MAX_EMAIL_LENGTH = 254  # RFC 5321's limit on a forward path

# WAL lets readers run beside the writer; FULL makes every commit survive a power cut;
# IMMEDIATE takes the write lock at BEGIN, so two writers queue on the busy timeout
# instead of deadlocking and failing with "database is locked".
SQLITE_OPTIONS = {
    'pragmas': {'journal_mode': 'wal', 'synchronous': 'full', 'foreign_keys': 1},
    'timeout': 15,
    'lock_type': 'IMMEDIATE',
}
# A dead server must fail a request quickly, not hang it.
SERVER_OPTIONS = {
    'postgres': {'connect_timeout': 5},
    'mysql': {'connect_timeout': 5, 'read_timeout': 15, 'write_timeout': 15},
}


class BaseModel(peewee.Model):
    class Meta:
        database = db


class Person(BaseModel):
    first_name = peewee.CharField(max_length=MAX_NAME_LENGTH)
    last_name = peewee.CharField(max_length=MAX_NAME_LENGTH)
    email = peewee.CharField(max_length=MAX_EMAIL_LENGTH)
    # See email_key(): its unique index makes the database itself refuse a second person
    # with the same address in another case.
    email_key = peewee.FixedCharField(max_length=64, unique=True)


class Outbox(BaseModel):
    """One welcome mail waiting to be sent; written in the same transaction as its person."""

    PENDING, SENT, FAILED = 'pending', 'sent', 'failed'

    recipient = peewee.CharField(max_length=254)
    first_name = peewee.CharField(max_length=100)
    last_name = peewee.CharField(max_length=100)
    status = peewee.CharField(max_length=8, default=PENDING)
    # When the row may next be claimed: a claim moves it forward by the lease, so a
    # sender that dies mid-send gives the row back when the lease runs out.
    due_at = peewee.DoubleField(default=time.time)
    attempts = peewee.IntegerField(default=0)
    claim = peewee.CharField(max_length=32, default='')
    last_error = peewee.CharField(max_length=200, default='')

    class Meta:
        indexes = ((('status', 'due_at'), False),)

    @classmethod
    def claim_due(cls, claim, *, now, lease, limit):
        """Lease up to `limit` due rows to `claim`: one conditional UPDATE, so two senders
        racing for a row cannot both win it, on any engine."""
        due = [row_id for (row_id,) in cls.select(cls.id).where(
            cls.status == cls.PENDING, cls.due_at <= now).order_by(cls.due_at).limit(limit).tuples()]
        if not due:
            return []
        with write_transaction():
            cls.update(claim=claim, due_at=now + lease, attempts=cls.attempts + 1).where(
                cls.id.in_(due), cls.status == cls.PENDING, cls.due_at <= now).execute()
        return list(cls.select().where(cls.id.in_(due), cls.claim == claim).order_by(cls.id))

    @classmethod
    def next_due_at(cls):
        return cls.select(peewee.fn.MIN(cls.due_at)).where(cls.status == cls.PENDING).scalar()

    @classmethod
    def mark_sent(cls, row_ids):
        if row_ids:
            cls._settle(cls.id.in_(row_ids), status=cls.SENT)

    @classmethod
    def mark_failed(cls, row_id, error):
        cls._settle(cls.id == row_id, status=cls.FAILED, last_error=error[:200])

    @classmethod
    def reschedule(cls, row_id, due_at, error):
        cls._settle(cls.id == row_id, due_at=due_at, last_error=error[:200])

    @classmethod
    def release(cls, claim, row_ids):
        """Hand back claimed rows that were not tried (the sender is stopping)."""
        if row_ids:
            cls._settle(cls.id.in_(row_ids) & (cls.claim == claim), due_at=time.time())

    @classmethod
    def _settle(cls, which, **changes):
        """End a claim on the rows `which` selects, with `changes`."""
        with write_transaction():
            cls.update(claim='', **changes).where(which).execute()


MODELS = [Person, Outbox]

# The hot paths' SQL, built once per bound database (connect() empties it): peewee's query
# builder costs more than running the statement (30 times more for the lookup by id).
_statements = {}
# SQLite admits one writer; the threads of a process queue here first, where the next one
# wakes at once, instead of in SQLite's busy handler, which sleeps up to 100 ms per try.
_sqlite_writers = threading.RLock()  # re-entrant: a nested write becomes a savepoint


def email_key(email):
    """The address lower-cased and hashed: equal exactly when the addresses are equal but
    for case, on every engine (MySQL's default collation would also equate 'é' and 'e')."""
    return hashlib.sha256(email.lower().encode()).hexdigest()


def connect(url):
    """Bind the models to the database at `url`; no connection is opened yet."""
    scheme = url.split(':', 1)[0].split('+', 1)[0]
    in_url = db_url.parse(url)
    if scheme == 'sqlite':
        options = SQLITE_OPTIONS
        if in_url['database'] != ':memory:':
            os.makedirs(os.path.dirname(os.path.abspath(in_url['database'])), exist_ok=True)
    else:
        options = SERVER_OPTIONS.get(scheme.replace('postgresql', 'postgres'), {})
    # Options spelled out in the URL's query string win over these defaults.
    database = db_url.connect(url, **{k: v for k, v in options.items() if k not in in_url})
    db.initialize(database)
    _statements.clear()
    return database


def is_sqlite():
    return isinstance(db.obj, peewee.SqliteDatabase)


def _statement(key, query):
    """The SQL of `query()`, built on the first call for `key` since connect()."""
    sql = _statements.get(key)
    if sql is None:
        sql = _statements[key] = query().sql()[0]
    return sql


def find_email(person_id):
    """The person's (id, email), or None."""
    sql = _statement('find_email',
                     lambda: Person.select(Person.id, Person.email).where(Person.id == 0))
    return db.execute_sql(sql, (person_id,)).fetchone()


def insert(model, **values):
    """INSERT one row of `model` (defaults fill the columns not given); returns its id."""
    columns = model._meta.sorted_fields[1:]  # all but the primary key, in peewee's order
    row = {column: values[column.name] if column.name in values else _default(column)
           for column in columns}
    sql = _statement(model, lambda: model.insert(row))
    cursor = db.execute_sql(sql, [column.db_value(value) for column, value in row.items()])
    return cursor.fetchone()[0] if db.returning_clause else cursor.lastrowid


def _default(column):
    return column.default() if callable(column.default) else column.default


@contextlib.contextmanager
def write_transaction():
    """A transaction for writes; on SQLite it begins IMMEDIATE (see SQLITE_OPTIONS)."""
    if is_sqlite():
        with _sqlite_writers, db.atomic():
            yield
    else:
        with db.atomic():
            yield


def skip_fsync_on_this_connection():
    """On SQLite, let this thread's commits skip the fsync: they still survive a crash of
    the process, and the next commit of a durable connection makes them durable too.

    For the courier's bookkeeping: a power cut can at worst forget that a mail was sent,
    which costs one duplicate, while an fsync per mail would halve how fast people can
    register (each fsync holds the single write lock).
    """
    if is_sqlite():
        db.execute_sql('PRAGMA synchronous = NORMAL')


def create_schema():
    """Create the tables if missing: idempotent, and safe when replicas start together."""
    with db.connection_context():
        with _schema_lock():
            db.create_tables(MODELS, safe=True)


@contextlib.contextmanager
def _schema_lock():
    """Serialise schema creation across processes: DDL is not atomic on every engine."""
    if isinstance(db.obj, peewee.PostgresqlDatabase):
        lock, unlock = 'SELECT pg_advisory_lock(7421001)', 'SELECT pg_advisory_unlock(7421001)'
    elif isinstance(db.obj, peewee.MySQLDatabase):
        lock, unlock = "SELECT GET_LOCK('personapi_schema', 60)", "SELECT RELEASE_LOCK('personapi_schema')"
    else:
        with db.atomic():  # SQLite: BEGIN IMMEDIATE already admits one writer at a time
            yield
        return
    db.execute_sql(lock)
    try:
        yield
    finally:
        db.execute_sql(unlock)


def main(argv):
    if argv[1:] != ['init']:
        sys.exit('usage: python models.py init')
    from config import Config

    connect(Config.from_env().database_url)
    create_schema()
    print('schema ready')


if __name__ == '__main__':
    main(sys.argv)

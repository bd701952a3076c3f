"""Schema migrations on every engine, from a database of schema version 1 with rows in it
(tests/schema_v1: the SQLite file and the SQL that version 1's code made)."""

import concurrent.futures
import os
import shutil
import subprocess
import sys

import pytest

import models
from models import Person
from support import ROOT, Service

SCHEMA_V1 = ROOT / 'tests' / 'schema_v1'
PERSONS_V1 = [(1, 'Ada', 'Lovelace', 'ada@example.com'), (2, 'José', 'Núñez', 'Jose@Example.com'),
              (4, '李', '小龙', 'li@example.com')]
# Version 1's outbox (Ada's mail sent, José's pending, Li's failed) as it is migrated: a
# sent mail's row is gone, the others name their person.
OUTBOX_MIGRATED = [(2, 'pending', 1700000001.5, 0), (4, 'failed', 1700000002.0, 3)]


@pytest.fixture
def v1_url(engine, tmp_path):
    """A URL to a database of schema version 1 holding PERSONS_V1 and three mails; the
    models are bound to it."""
    name, server_url = engine
    if server_url is None:
        shutil.copy(SCHEMA_V1 / 'sqlite.db', tmp_path / 'persons.db')
        url = f'sqlite:///{tmp_path}/persons.db'
        models.connect(url)
    else:
        url = server_url
        models.connect(url)
        models.db.drop_tables(models.MODELS, safe=True)
        script = (SCHEMA_V1 / f'{name}.sql').read_text()
        for statement in script.split(';\n'):
            if statement.strip():
                models.db.execute_sql(statement)
    assert models.schema_version() == 1
    yield url
    models.db.close()


def persons():
    return list(Person.select(Person.id, Person.first_name, Person.last_name, Person.email)
                .order_by(Person.id).tuples())


def outbox():
    return list(models.Outbox.select(models.Outbox.person, models.Outbox.status,
                                     models.Outbox.due_at, models.Outbox.attempts)
                .order_by(models.Outbox.person).tuples())


def schema():
    """Every table's columns, indexes and foreign keys, as the engine describes them."""
    db = models.db
    return {table: (sorted(column._replace(table=None) for column in db.get_columns(table)),
                    sorted((index.name, tuple(index.columns), index.unique)
                           for index in db.get_indexes(table)),
                    sorted(db.get_foreign_keys(table)))
            for table in db.get_tables()}


def test_migrating_version_1_keeps_every_row(v1_url):
    models.migrate()
    assert models.schema_version() == models.SCHEMA_VERSION
    assert persons() == PERSONS_V1
    assert outbox() == OUTBOX_MIGRATED
    assert [row.failed_at is None for row in models.Outbox.select().order_by(models.Outbox.person)] == [
        True, False]
    assert [person.version for person in Person.select()] == [1, 1, 1]
    assert [person.email_key for person in Person.select()] == [
        models.email_key(email) for *_, email in PERSONS_V1]


def test_a_migrated_database_has_the_schema_of_a_new_one(v1_url):
    models.migrate()
    migrated = schema()
    models.db.drop_tables(models.MODELS)
    models.migrate()
    assert schema() == migrated


def test_after_migrating_ids_are_never_reused(v1_url):
    models.migrate()
    Person.delete().where(Person.id == 4).execute()  # the newest
    new_id = models.insert(Person, first_name='Grace', last_name='Hopper',
                           email='grace@example.com', email_key=models.email_key('grace@example.com'))
    assert new_id == 5


@pytest.mark.parametrize('step', range(len(models.MIGRATIONS)))
def test_a_step_run_again_after_an_interrupted_run_completes(v1_url, step):
    """MySQL commits each DDL statement at once: a step cut short is run again."""
    with models.db.atomic():
        for earlier in models.MIGRATIONS[:step + 1]:
            earlier()  # the last one's version is not recorded, as after a crash
        models.SchemaVersion.create_table()
        models.SchemaVersion.create(version=step + 1)
    models.migrate()
    assert models.schema_version() == models.SCHEMA_VERSION
    assert (persons(), outbox()) == (PERSONS_V1, OUTBOX_MIGRATED)


def migrate_command(url):
    return subprocess.run([sys.executable, 'models.py', 'migrate'], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, 'DATABASE_URL': url})


def test_replicas_migrating_together_migrate_once(v1_url):
    models.db.close()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(migrate_command, [v1_url] * 4))
    assert [result.returncode for result in results] == [0] * 4, results[0].stderr
    recorded = models.SchemaVersion.select(models.SchemaVersion.version).order_by(
        models.SchemaVersion.version)
    assert [row.version for row in recorded] == list(range(2, models.SCHEMA_VERSION + 1))
    assert persons() == PERSONS_V1


def test_migrate_on_an_up_to_date_database_changes_nothing(v1_url):
    models.migrate()
    before = (schema(), persons(), outbox(), models.service_key(models.CURSOR_KEY))
    models.db.close()
    result = migrate_command(v1_url)
    assert result.returncode == 0, result.stderr
    assert (schema(), persons(), outbox(), models.service_key(models.CURSOR_KEY)) == before


def test_gunicorn_migrates_at_start_and_serves_the_old_rows(v1_url, tmp_path):
    models.db.close()
    service = Service({'DATABASE_URL': v1_url, 'SMTP_PORT': '1', 'RATE_LIMIT': 'off'},
                      log_path=tmp_path / 'gunicorn.log').start()
    try:
        status, headers, body = service.request('GET', '/person/2')
        assert (status, headers['ETag'], body) == (200, '"2-1"', {'id': 2, 'email': PERSONS_V1[1][3]})
        first = service.request('GET', '/person?limit=2')[2]
        assert [item['id'] for item in first['items']] == [1, 2]
        assert [item['id'] for item in service.request('GET', first['next'])[2]['items']] == [4]
    finally:
        service.kill()
    assert models.schema_version() == models.SCHEMA_VERSION

"""Log lines: one per record whatever a client sends, in text or JSON, with tracebacks that
keep their frames and types but never an exception's message."""

import io
import json
import logging
import smtplib
import socket
import sys
import time
import urllib.request

import pytest
from gunicorn.config import Config as GunicornConfig

import logs
import personapi
from support import Service, one_engine

FORMATS = ['text', 'json']
SECRET_PERSON = {'first_name': 'Zenobia', 'last_name': 'Quillfeather',
                 'email': 'zq.secret@example.com'}
SECRETS = ('Zenobia', 'Quillfeather', 'zq.')
BASE_FIELDS = {'time', 'level', 'logger', 'message', 'request_id'}
ACCESS_FIELDS = BASE_FIELDS | {'method', 'route', 'path', 'status', 'duration_ms', 'client'}
# Paths that would write more than one line, or bytes no log should hold, if printed raw.
FORGING_PATHS = ['/x%0A127.0.0.1%20"DELETE%20/person/5"%20204', '/x%0D%0A%0D%0Ay', '/x%00y',
                 '/x%1B[31mred', '/x%C2%85y', '/x%E2%80%A8y', '/x%E2%80%A9y', '/x%7Fy',
                 '/x%5C%22y']
ADDRESS = 'full' + '@example.com'  # made at run time: a frame shows its source line
LINE_BREAKS = '\n\r\x00\x0b\x0c\x1c\x1d\x1e\x1b\x85\x7f\u2028\u2029'


def refused_recipient():
    """An SMTP refusal chained to the error it caused, as the courier would meet it."""
    try:
        try:
            raise smtplib.SMTPRecipientsRefused({ADDRESS: (550, f'no {ADDRESS}'.encode())})
        except smtplib.SMTPRecipientsRefused as refusal:
            raise RuntimeError(f'while mailing {ADDRESS}') from refusal
    except RuntimeError as error:
        return error


# --- Formatters -----------------------------------------------------------------------------

@pytest.fixture
def app_log(monkeypatch):
    """Configure the app's loggers as the service does, into a string; undone after."""
    stream = io.StringIO()
    root = logging.getLogger()
    level = root.level

    def configure(log_format):
        monkeypatch.setattr(sys, 'stderr', stream)  # here: pytest sets its own for the test
        logs.configure(log_format)
        return stream
    yield configure
    for handler in root.handlers[:]:
        if isinstance(handler.formatter, (logs.TextFormatter, logs.JsonFormatter)):
            root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture
def gunicorn_log(monkeypatch):
    """gunicorn's error log as the service sets it up, into a string; undone after."""
    stream = io.StringIO()
    loggers = []

    def configure(log_format):
        monkeypatch.setattr(sys, 'stderr', stream)
        monkeypatch.setattr(logs.GunicornLogger, 'log_format', log_format)
        loggers.append(logs.GunicornLogger(GunicornConfig()))
        return loggers[-1], stream
    yield configure
    for logger in loggers:
        for log in (logger.error_log, logger.access_log):
            log.handlers.clear()


def assert_traceback_without_messages(text):
    assert ADDRESS not in text
    assert 'smtplib.SMTPRecipientsRefused' in text and 'RuntimeError' in text
    assert 'The above exception was the direct cause' in text
    assert 'in refused_recipient' in text and 'test_logs.py' in text  # the frames


@pytest.mark.parametrize('log_format', FORMATS)
def test_an_app_traceback_keeps_frames_and_types_but_no_message(app_log, log_format):
    stream = app_log(log_format)
    logging.getLogger('personapi.mailer').error('delivery failed', exc_info=refused_recipient())
    text = stream.getvalue()
    if log_format == 'json':
        (line,) = text.splitlines()
        text = json.loads(line)['exception']
    assert_traceback_without_messages(text)


@pytest.mark.parametrize('log_format', FORMATS)
def test_a_gunicorn_traceback_keeps_frames_and_types_but_no_message(gunicorn_log, log_format):
    logger, stream = gunicorn_log(log_format)
    try:
        raise refused_recipient()
    except RuntimeError:
        logger.exception('Error handling request /person')
    text = stream.getvalue()
    if log_format == 'json':
        (line,) = text.splitlines()
        assert json.loads(line)['logger'] == 'gunicorn.error'
        text = json.loads(line)['exception']
    assert_traceback_without_messages(text)


def test_a_traceback_another_formatter_cached_is_not_reused(app_log):
    stream = app_log('text')
    record = logging.getLogger('personapi').makeRecord(
        'personapi', logging.ERROR, __file__, 1, 'failed', (),
        (RuntimeError, refused_recipient(), refused_recipient().__traceback__))
    logging.Formatter().format(record)  # caches the full text, messages and all
    logging.getLogger('personapi').handle(record)
    assert ADDRESS not in stream.getvalue()


@pytest.mark.parametrize('log_format', FORMATS)
@pytest.mark.parametrize('text', ['a\nforged line', 'a\r\nb', 'nul\x00', 'esc\x1b[2J',
                                  'nel\x85', 'ls\u2028ps\u2029', 'del\x7f'])
def test_a_message_is_one_line_whatever_it_holds(app_log, log_format, text):
    stream = app_log(log_format)
    logging.getLogger('personapi').warning('got %s', text)
    written = stream.getvalue()
    assert written.count('\n') == 1 and written.endswith('\n')
    assert not set(written[:-1]) & set(LINE_BREAKS)


def test_an_app_line_names_the_request_it_is_about(app_log, client, monkeypatch):
    stream = app_log('json')

    def broken(*args):
        raise ValueError(f'{ADDRESS} is broken')
    monkeypatch.setattr(personapi.models, 'find_email_and_version', broken)
    response = client.get('/person/1', status=500)
    (line,) = [line for line in map(json.loads, stream.getvalue().splitlines())
               if line['level'] == 'ERROR']
    assert line['request_id'] == response.headers['X-Request-ID']
    assert line['level'] == 'ERROR' and 'ValueError' in line['exception']
    assert ADDRESS not in stream.getvalue()


# --- The running service --------------------------------------------------------------------

def raw_get(service, path):
    """GET `path` exactly as given, on its own connection; returns the status line."""
    with socket.create_connection(('127.0.0.1', service.port), timeout=10) as connection:
        connection.sendall(f'GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n'.encode())
        return connection.makefile('rb').readline()


@one_engine  # the paths never reach the database
@pytest.mark.parametrize('log_format', FORMATS)
def test_one_request_is_one_access_line_whatever_its_path(service_env, tmp_path, log_format):
    log_path = tmp_path / 'gunicorn.log'
    service = Service({**service_env, 'LOG_FORMAT': log_format}, log_path=log_path).start()
    try:
        for path in FORGING_PATHS:
            assert b' 404 ' in raw_get(service, path)
    finally:
        service.stop()
    raw = log_path.read_bytes()
    assert b'\x00' not in raw
    lines = raw.decode().split('\n')
    assert not set(''.join(lines)) & set(LINE_BREAKS)
    access = [line for line in lines if 'GET /x' in line]
    assert len(access) == len(FORGING_PATHS)
    assert not [line for line in lines if 'DELETE' in line and line not in access]
    if log_format == 'json':
        paths = {json.loads(line)['path'] for line in access}  # as sent, JSON-escaped
        assert {'/x\n127.0.0.1 "DELETE /person/5" 204', '/x\x00y', '/x\u2028y'} <= paths
    else:
        assert all(line.startswith('127.0.0.1 "GET /x') and ' 404 ' in line for line in access)


def test_json_logs_are_one_object_per_line_with_the_fields_and_no_personal_data(
        service_env, tmp_path):
    log_path = tmp_path / 'gunicorn.log'
    env = {**service_env, 'LOG_FORMAT': 'json', 'SMTP_PORT': '1'}  # every mail is retried
    service = Service(env, log_path=log_path).start()
    try:
        person_id = service.request('POST', '/person', SECRET_PERSON)[2]['id']
        service.request('POST', '/person', SECRET_PERSON)  # 409
        service.request('PUT', f'/person/{person_id}', {**SECRET_PERSON, 'email': 'zq.2@x.org'})
        service.request('POST', '/person', {**SECRET_PERSON, 'email': 'zq.bad@'})  # 422
        service.request('GET', f'/person/{person_id}?email=zq.query@example.com')
        assert service.request('GET', '/person?email=zq.2%40x.org')[2]['items']  # names, address
        service.request('GET', '/person?email=zq.bad%40')  # 400
        urllib.request.urlopen(f'{service.url}/metrics', timeout=10).close()
        time.sleep(1.5)  # let the courier fail and log
    finally:
        service.stop()
    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert {line['logger'] for line in lines} >= {'gunicorn.error', 'gunicorn.access',
                                                  'personapi.mailer'}
    for line in lines:
        assert line.keys() >= BASE_FIELDS
        assert not any(secret in json.dumps(line) for secret in SECRETS)
    access = [line for line in lines if line['logger'] == 'gunicorn.access']
    assert all(line.keys() >= ACCESS_FIELDS for line in access)
    post = next(line for line in access if line['method'] == 'POST')
    assert (post['route'], post['path'], post['status']) == ('/person', '/person', 201)
    assert post['request_id'] and post['client'] == '127.0.0.1' and post['duration_ms'] >= 0
    get = next(line for line in access if line['path'] == f'/person/{person_id}')
    assert get['route'] == '/person/{person_id}'
    # Sorted: each worker writes its own lines, so two requests' lines may come in either order.
    assert sorted((line['route'], line['status']) for line in access
                  if line['method'] == 'GET' and line['path'] == '/person') == [('/person', 200),
                                                                                ('/person', 400)]

"""The welcome mail through the outbox, against a real SMTP server (aiosmtpd)."""

import os
import ssl
import subprocess
import sys
import time

import pytest
from aiosmtpd.smtp import AuthResult

import mailer
import models
from mailer import Courier, Smtp
from models import Outbox
from support import ROOT, SmtpSink, free_port, wait_until

ADA = {'first_name': 'Ada', 'last_name': 'Lovelace', 'email': 'ada@example.com'}


def register(client, **fields):
    return client.post_json('/person', {**ADA, **fields}, status=201).json


def outbox_row():
    return Outbox.get()


def test_the_welcome_mail_names_the_person_and_comes_from_mail_from(client, courier, smtp):
    register(client, first_name='José María', last_name='李 Zoë',
             email='jose@example.com')
    assert courier.deliver_due() == 1
    [(recipients, message)] = smtp.received()
    assert recipients == ['jose@example.com']
    assert message['To'] == 'jose@example.com'
    assert message['From'] == 'Person API <no-reply@personapi.local>'
    assert 'José María 李 Zoë' in message['Subject']
    assert 'José María 李 Zoë' in message.get_body(('plain',)).get_content()
    assert outbox_row().status == Outbox.SENT


def test_a_sent_mail_is_not_sent_again(client, courier, smtp):
    register(client)
    courier.deliver_due()
    assert courier.deliver_due() == 0
    assert len(smtp.received()) == 1


def test_an_internationalised_address_is_delivered(client, courier, smtp):
    register(client, email='zoë@exämple.com')
    courier.deliver_due()
    assert [recipients for recipients, _ in smtp.received()] == [['zoë@exämple.com']]


def test_smtp_down_reschedules_with_capped_exponential_backoff(config, client):
    courier = Courier(Smtp('127.0.0.1', free_port(), timeout=2), config.mail_from, max_backoff=4)
    register(client)
    delays = []
    for _ in range(6):
        Outbox.update(due_at=0).execute()  # due now, without waiting out the backoff
        before = time.time()
        courier.deliver_due()
        row = outbox_row()
        assert (row.status, row.claim, row.last_error) == (Outbox.PENDING, '', 'ConnectionRefusedError')
        delays.append(row.due_at - before)
    assert outbox_row().attempts == 6
    assert 0.4 <= delays[0] <= 1.1  # 1 s, jittered down to half at most
    assert all(1.9 <= delay <= 4.1 for delay in delays[2:])  # 2 s, then capped at 4 s


@pytest.mark.parametrize('reply', ['550 5.1.1 no such user', '554 5.7.1 rejected'])
def test_a_permanent_rejection_stops_the_retries(client, courier, smtp, reply):
    register(client)
    smtp.reply = reply
    courier.deliver_due()
    smtp.reply = None
    Outbox.update(due_at=0).execute()
    assert courier.deliver_due() == 0
    row = outbox_row()
    assert (row.status, row.attempts, row.last_error) == (Outbox.FAILED, 1, 'SMTPDataError ' + reply[:3])
    assert smtp.received() == []


def test_a_temporary_rejection_is_retried(client, courier, smtp):
    register(client)
    smtp.reply = '451 4.3.0 try again later'
    courier.deliver_due()
    assert outbox_row().status == Outbox.PENDING
    smtp.reply = None
    Outbox.update(due_at=0).execute()
    assert courier.deliver_due() == 1
    assert len(smtp.received()) == 1 and outbox_row().status == Outbox.SENT


@pytest.mark.parametrize('first_name', ['Ada\r\nBcc: victim@example.com', 'Ada\nX-Evil: 1',
                                        'Ada\u2028Bcc: victim@example.com', 'Ada\x1b[2J'])
def test_the_mailer_never_builds_a_header_from_unchecked_text(courier, smtp, first_name):
    # Bypasses the API's validation, as a row written by older code or by hand could.
    Outbox.create(recipient='ada@example.com', first_name=first_name, last_name='Lovelace')
    with pytest.raises(mailer.PermanentFailure):
        mailer.compose(outbox_row(), 'no-reply@example.com')
    courier.deliver_due()
    assert smtp.received() == []
    assert outbox_row().status == Outbox.FAILED


def test_a_claimed_mail_is_invisible_to_other_senders_until_its_lease_ends(client):
    register(client)
    now = time.time()
    [claimed] = Outbox.claim_due('first', now=now, lease=60, limit=10)
    assert Outbox.claim_due('second', now=now + 59, lease=60, limit=10) == []
    # The first sender died mid-send: after the lease, another one takes the mail over.
    [taken_over] = Outbox.claim_due('second', now=now + 61, lease=60, limit=10)
    assert taken_over.id == claimed.id and taken_over.attempts == 2


def test_the_courier_thread_delivers_promptly_after_a_post(client, courier, smtp):
    courier.start()
    try:
        started = time.monotonic()
        register(client)
        assert smtp.wait_for(1, timeout=5) == 1
        assert time.monotonic() - started < 2
    finally:
        courier.stop()
    assert not courier.running


def test_a_stopping_courier_hands_back_what_it_has_not_sent(client, courier, smtp):
    for number in range(3):
        register(client, email=f'person{number}@example.com')
    smtp.delay = 0.5
    courier.start()
    assert wait_until(lambda: Outbox.select().where(Outbox.claim != '').count() == 3, 5)
    courier.stop()
    sent = Outbox.select().where(Outbox.status == Outbox.SENT).count()
    assert sent < 3
    assert Outbox.select().where(Outbox.claim != '').count() == 0
    assert Outbox.claim_due('next', now=time.time(), lease=60, limit=10)


# --- STARTTLS and login ---------------------------------------------------------------------

@pytest.fixture
def certificate(tmp_path):
    """A self-signed certificate for 127.0.0.1, made here."""
    key, cert = tmp_path / 'key.pem', tmp_path / 'cert.pem'
    subprocess.run(['openssl', 'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '1',
                    '-subj', '/CN=127.0.0.1', '-addext', 'subjectAltName=IP:127.0.0.1',
                    '-keyout', str(key), '-out', str(cert)], check=True, capture_output=True)
    return cert, key


@pytest.fixture
def secure_smtp(certificate):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*map(str, certificate))

    def authenticate(server, session, envelope, mechanism, auth_data):
        return AuthResult(success=(auth_data.login, auth_data.password) == (b'mailer', b's3cret'))

    sink = SmtpSink(tls_context=context, require_starttls=True, authenticator=authenticate,
                    auth_required=True, auth_require_tls=True).start()
    yield sink
    sink.stop()


def secure_courier(config, sink, **options):
    smtp = Smtp('127.0.0.1', sink.port, timeout=5, starttls=True, **options)
    return Courier(smtp, config.mail_from, max_backoff=1)


def test_starttls_and_login(client, config, secure_smtp, certificate, monkeypatch):
    monkeypatch.setenv('SSL_CERT_FILE', str(certificate[0]))  # trust the test's own CA
    register(client)
    secure_courier(config, secure_smtp, username='mailer', password='s3cret').deliver_due()
    assert [recipients for recipients, _ in secure_smtp.received()] == [['ada@example.com']]


@pytest.mark.parametrize('trust, password', [(True, 'wrong'), (False, 's3cret')])
def test_a_bad_password_or_an_untrusted_certificate_sends_nothing_and_retries(
        client, config, secure_smtp, certificate, monkeypatch, trust, password):
    if trust:
        monkeypatch.setenv('SSL_CERT_FILE', str(certificate[0]))
    register(client)
    secure_courier(config, secure_smtp, username='mailer', password=password).deliver_due()
    assert secure_smtp.received() == []
    assert outbox_row().status == Outbox.PENDING and outbox_row().attempts == 1


def test_mailer_once_delivers_what_is_due_and_exits(client, database_url, smtp):
    for number in range(3):
        register(client, email=f'person{number}@example.com')
    models.db.close()
    env = {**os.environ, 'DATABASE_URL': database_url, 'SMTP_HOST': '127.0.0.1',
           'SMTP_PORT': str(smtp.port)}
    result = subprocess.run([sys.executable, 'mailer.py', '--once'], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert '3 mail(s) handled' in result.stdout
    assert sorted(rcpt for rcpts, _ in smtp.received() for rcpt in rcpts) == [
        f'person{number}@example.com' for number in range(3)]
    assert Outbox.select().where(Outbox.status == Outbox.SENT).count() == 3

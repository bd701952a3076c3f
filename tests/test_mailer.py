"""The welcome mail through the outbox, against a real SMTP server (aiosmtpd) that, like most
relays, offers no SMTPUTF8 unless a test asks for it."""

import email.header
import logging
import os
import ssl
import subprocess
import sys
import time

import pytest
from aiosmtpd.smtp import AuthResult

import models
from mailer import Courier, Smtp
from models import Outbox, Person
from support import ROOT, RefusingRelay, SmtpSink, free_port, wait_until

ADA = {'first_name': 'Ada', 'last_name': 'Lovelace', 'email': 'ada@example.com'}
SERVICE_HEADERS = {'From', 'To', 'Subject', 'Date', 'Message-ID', 'MIME-Version',
                   'Content-Type', 'Content-Transfer-Encoding'}
SENDER = 'no-reply@personapi.local'


def register(client, **fields):
    return client.post_json('/person', {**ADA, **fields}, status=201).json


def service_log(caplog):
    """What the service logged (the test SMTP server logs addresses, as servers do)."""
    return '\n'.join(caplog.handler.format(record) for record in caplog.records
                     if record.name.startswith('personapi'))


def queued_row():
    return Outbox.get()


def header_names(raw):
    """The names of the message's header fields, read from its bytes (folded lines joined)."""
    head = raw.split(b'\r\n\r\n', 1)[0].decode('utf-8')
    return [line.split(':', 1)[0] for line in head.split('\r\n') if line[:1] not in (' ', '\t')]


def raw_header(raw, name):
    head = raw.split(b'\r\n\r\n', 1)[0].decode('utf-8').replace('\r\n ', ' ')
    [value] = [line.split(':', 1)[1].strip() for line in head.split('\r\n')
               if line.split(':', 1)[0] == name]
    return value


def decoded(value):
    """A header value as a mail client shows it, by the legacy decoder (not email.policy)."""
    return str(email.header.make_header(email.header.decode_header(value)))


def assert_one_faithful_mail(smtp, person, recipient=None):
    """Exactly one mail, to exactly the stored address, with only the service's headers and
    the stored names in its Subject, as two different decoders read it."""
    [mail] = smtp.received()
    assert mail.rcpt_tos == [recipient or person['email']]
    assert mail.mail_from == SENDER
    assert sorted(header_names(mail.raw)) == sorted(SERVICE_HEADERS)
    subject = f"Welcome, {person['first_name']} {person['last_name']}!"
    assert mail.message['Subject'] == subject
    assert decoded(raw_header(mail.raw, 'Subject')) == subject
    assert f"Hello {person['first_name']} {person['last_name']}," in (
        mail.message.get_body(('plain',)).get_content())
    return mail


# --- What a mail looks like -----------------------------------------------------------------

def test_the_welcome_mail_names_the_person_and_comes_from_mail_from(client, courier, smtp):
    person = register(client, first_name='José María', last_name='李 Zoë',
                      email='jose@example.com')
    assert courier.deliver_due() == 1
    mail = assert_one_faithful_mail(smtp, person)
    assert mail.message['To'] == 'jose@example.com'
    assert mail.message['From'] == 'Person API <no-reply@personapi.local>'
    assert mail.message.get_content_type() == 'text/plain'
    assert mail.raw.isascii()  # any server takes it: no SMTPUTF8 or 8BITMIME needed


def test_a_sent_mail_leaves_nothing_in_the_outbox_and_is_not_sent_again(client, courier, smtp):
    register(client)
    courier.deliver_due()
    assert Outbox.select().count() == 0
    assert courier.deliver_due() == 0
    assert len(smtp.received()) == 1


HOSTILE_NAMES = [
    '=?utf-8?q?X=0D=0ABcc:_someone@evil.example?=',
    '=?utf-8?q?X=0D=0A=0D=0Abody_chosen_by_the_sender?=',
    '=?UTF-8?B?WA0KQmNjOiBzb21lb25lQGV2aWwuZXhhbXBsZQ==?=',
    '=?iso-8859-1?q?X=0ABcc:_victim@evil.example?=',
    '=?utf-8?q?X=E2=80=A8Bcc:_victim@evil.example?=',
    '=?utf-8?q?Reply-To:_x@evil.example?= =?utf-8?q?Cc:_y@evil.example?=',
    '=?utf-8?b?', '?=', '=?=', 'Ada =?utf-8?q?=41?= Lovelace',
    'Bcc: victim@evil.example', 'Ada <victim@evil.example>', '"Ada", victim@evil.example',
    'Ada; Cc: x@evil.example', 'Ada\\r\\nBcc: x', 'A' * 100, '李' * 100, 'é' * 99 + 'x',
    'Zoë 😀 =?utf-8?q?x?=', "O'Brien (the \"elder\")",
]


@pytest.mark.parametrize('name', HOSTILE_NAMES)
def test_no_name_becomes_header_syntax(client, courier, smtp, name):
    person = register(client, first_name=name, last_name=name[::-1])
    courier.deliver_due()
    mail = assert_one_faithful_mail(smtp, person)
    assert mail.raw.isascii()


@pytest.mark.parametrize('name', ['Ada\r\nBcc: x@evil.example', 'Ada\n Bcc: x', 'Ada\u2028Bcc',
                                  'Ada\x00', 'Ada\x85Bcc'])
def test_a_name_that_could_end_a_header_is_refused(client, name):
    response = client.post_json('/person', {**ADA, 'first_name': name}, status=422)
    assert 'first_name' in response.json['description']
    assert Outbox.select().count() == 0


@pytest.mark.parametrize('email', [
    '=?utf-8?q?victim?=@example.com', '=?utf-8?q?a=0D=0ABcc:_x@evil.example?=@example.com',
    'x=?y@example.com', '"quoted"@example.com', 'a b@example.com', 'victim@example.com,x@y.z',
    '<victim@example.com>', 'Victim <victim@example.com>', 'victim@example.com\r\nBcc: x@y.z'])
def test_an_address_that_is_not_exactly_one_plain_mailbox_is_refused(client, email):
    response = client.post_json('/person', {**ADA, 'email': email}, status=422)
    assert 'email' in response.json['description']
    assert Person.select().count() == 0


@pytest.mark.parametrize('email', ['a.b+tag@example.com', "o'brien@example.com",
                                   'x!#$%&*/=^_`{|}~-@example.com', 'UPPER@Example.COM'])
def test_an_unusual_address_gets_its_mail_at_exactly_that_address(client, courier, smtp, email):
    person = register(client, email=email)
    courier.deliver_due()
    assert_one_faithful_mail(smtp, person)


# --- Internationalised addresses ------------------------------------------------------------

def test_an_idn_domain_goes_out_in_its_ascii_form_to_a_server_without_smtputf8(
        client, courier, smtp):
    person = register(client, email='user@xn--bcher-kva.example')
    assert person['email'] == 'user@bücher.example'
    courier.deliver_due()
    mail = assert_one_faithful_mail(smtp, person, recipient='user@xn--bcher-kva.example')
    assert mail.message['To'] == 'user@xn--bcher-kva.example'


def test_a_non_ascii_local_part_fails_at_once_without_smtputf8(client, courier, smtp):
    register(client, email='zoë@example.com')
    courier.deliver_due()
    assert smtp.received() == []
    row = queued_row()
    assert (row.status, row.last_error, row.attempts) == (
        Outbox.FAILED, 'recipient needs SMTPUTF8', 1)


@pytest.fixture
def utf8_smtp():
    sink = SmtpSink(smtputf8=True).start()
    yield sink
    sink.stop()


def test_a_non_ascii_address_is_delivered_where_smtputf8_is_offered(client, config, utf8_smtp):
    person = register(client, email='zoë@exämple.com')
    Courier(Smtp('127.0.0.1', utf8_smtp.port), config.mail_from).deliver_due()
    mail = assert_one_faithful_mail(utf8_smtp, person)
    assert mail.message['To'] == 'zoë@exämple.com'


# --- Every failure settles its own mail, and only its own -----------------------------------

def store_unchecked(**fields):
    """A person and its mail written past the API's checks, as older code or a hand-made
    row could: the courier must not trust the database either."""
    person = Person.create(**{**ADA, **fields, 'email_key': models.email_key(fields['email'])})
    Outbox.create(person=person)


@pytest.mark.parametrize('poison', [
    {'email': '=?utf-8?q?x=0D=0A?=@example.com'}, {'email': 'bad\r\nBcc: x@y.z@example.com'},
    {'email': 'a@-bücher-.example'}, {'email': 'x@exa mple.com'},
    {'email': 'p@example.com', 'first_name': 'Ada\r\nBcc: victim@example.com'},
    {'email': 'q@example.com', 'last_name': 'Lovelace\x1b[2J'}])
def test_a_poison_mail_fails_alone_and_the_rest_of_its_batch_goes_out(client, courier, smtp,
                                                                       poison, caplog):
    register(client, email='first@example.com')
    store_unchecked(**poison)
    register(client, email='second@example.com')
    register(client, email='third@example.com')
    assert courier.deliver_due() == 4
    assert smtp.recipients() == ['first@example.com', 'second@example.com', 'third@example.com']
    [failed] = Outbox.select()
    assert failed.status == Outbox.FAILED and failed.last_error
    assert poison['email'] not in service_log(caplog)


def test_a_refused_recipient_fails_alone(client, courier, smtp, caplog):
    for name in ('one', 'two', 'three'):
        register(client, email=f'{name}@example.com')
    smtp.refuse['two@example.com'] = '550 5.1.1 <two@example.com>: no such user'
    courier.deliver_due()
    assert smtp.recipients() == ['one@example.com', 'three@example.com']
    [failed] = Outbox.select()
    assert (failed.status, failed.last_error) == (Outbox.FAILED, 'SMTPRecipientsRefused 550')
    assert 'two@example.com' not in service_log(caplog)


@pytest.mark.parametrize('refusal', ['rcpt', 'data'])
def test_a_temporary_refusal_of_one_mail_is_retried(client, courier, smtp, refusal):
    register(client)
    if refusal == 'rcpt':
        smtp.refuse['ada@example.com'] = '450 4.2.1 mailbox busy'
    else:
        smtp.reply = '451 4.3.0 try again later'
    courier.deliver_due()
    assert queued_row().status == Outbox.PENDING and smtp.received() == []
    smtp.refuse, smtp.reply = {}, None
    Outbox.update(due_at=0).execute()
    assert courier.deliver_due() == 1
    assert len(smtp.received()) == 1 and Outbox.select().count() == 0


@pytest.mark.parametrize('reply', ['550 5.1.1 no such user', '554 5.7.1 rejected'])
def test_a_permanent_rejection_of_the_message_stops_its_retries(client, courier, smtp, reply):
    register(client)
    smtp.reply = reply
    courier.deliver_due()
    smtp.reply = None
    Outbox.update(due_at=0).execute()
    assert courier.deliver_due() == 0
    row = queued_row()
    assert (row.status, row.attempts, row.last_error) == (Outbox.FAILED, 1, 'SMTPDataError ' + reply[:3])
    assert smtp.received() == []


# --- A relay's problem is not a mail's problem ----------------------------------------------

def test_a_relay_that_refuses_mail_from_for_a_while_delivers_everything_after(
        client, courier, smtp, caplog):
    for number in range(3):
        register(client, email=f'person{number}@example.com')
    smtp.mail_reply = '530 5.7.0 Authentication required'
    for _ in range(3):
        Outbox.update(due_at=0).execute()
        courier.deliver_due()
        assert [row.status for row in Outbox.select()] == [Outbox.PENDING] * 3
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 3 and all('SMTPSenderRefused 530' in r.getMessage() for r in errors)
    smtp.mail_reply = None
    Outbox.update(due_at=0).execute()
    courier.deliver_due()
    assert smtp.recipients() == [f'person{number}@example.com' for number in range(3)]


@pytest.mark.parametrize('greeting', ['554 5.3.2 no service here', '421 4.3.2 busy'])
def test_a_refusing_greeting_leaves_the_mail_pending(client, config, greeting, caplog):
    relay = RefusingRelay(greeting)
    try:
        register(client)
        Courier(Smtp('127.0.0.1', relay.port, timeout=2), config.mail_from).deliver_due()
    finally:
        relay.stop()
    row = queued_row()
    assert (row.status, row.last_error) == (Outbox.PENDING, f'SMTPConnectError {greeting[:3]}')
    assert f'SMTPConnectError {greeting[:3]}' in caplog.text


def test_smtp_down_reschedules_with_capped_exponential_backoff(config, client):
    courier = Courier(Smtp('127.0.0.1', free_port(), timeout=2), config.mail_from, max_backoff=4)
    register(client)
    delays = []
    for _ in range(6):
        Outbox.update(due_at=0).execute()  # due now, without waiting out the backoff
        before = time.time()
        courier.deliver_due()
        row = queued_row()
        assert (row.status, row.claim, row.last_error) == (Outbox.PENDING, '', 'ConnectionRefusedError')
        delays.append(row.due_at - before)
    assert queued_row().attempts == 6
    assert 0.4 <= delays[0] <= 1.1  # 1 s, jittered down to half at most
    assert all(1.9 <= delay <= 4.1 for delay in delays[2:])  # 2 s, then capped at 4 s


@pytest.mark.parametrize('attempts', [1025, 2000, 10 ** 9])
def test_backoff_never_overflows(config, client, attempts):
    courier = Courier(Smtp('127.0.0.1', free_port(), timeout=2), config.mail_from, max_backoff=7)
    assert 3.5 <= courier.backoff(attempts) <= 7
    register(client)
    Outbox.update(attempts=attempts).execute()
    courier.deliver_due()
    assert queued_row().status == Outbox.PENDING and queued_row().due_at > time.time() + 3


def test_a_mail_that_keeps_failing_is_given_up_after_mail_give_up_after(config, client, caplog):
    courier = Courier(Smtp('127.0.0.1', free_port(), timeout=2), config.mail_from,
                      give_up_after=3600)
    register(client)
    courier.deliver_due()
    assert queued_row().status == Outbox.PENDING
    Outbox.update(due_at=0, created_at=time.time() - 3601).execute()
    courier.deliver_due()
    row = queued_row()
    assert row.status == Outbox.FAILED
    assert row.last_error == 'gave up after 2 attempts: ConnectionRefusedError'


# --- Leases ---------------------------------------------------------------------------------

def test_a_claimed_mail_is_invisible_to_other_senders_until_its_lease_ends(client):
    register(client)
    now = time.time()
    [claimed] = Outbox.claim_due('first', now=now, lease=60, limit=10)
    assert Outbox.claim_due('second', now=now + 59, lease=60, limit=10) == []
    # The first sender died mid-send: after the lease, another one takes the mail over.
    [taken_over] = Outbox.claim_due('second', now=now + 61, lease=60, limit=10)
    assert taken_over.id == claimed.id and taken_over.attempts == 2


def test_a_server_slow_on_every_reply_gets_each_mail_once(config, client, smtp):
    """Each reply takes 0.9 x SMTP_TIMEOUT: a batch outlasts its lease, which must be renewed
    before it runs out, or another sender would take over mails the first has sent."""
    for number in range(20):
        register(client, email=f'slow{number}@example.com')
    smtp.delay = 0.45
    couriers = [Courier(Smtp('127.0.0.1', smtp.port, timeout=0.5), config.mail_from, senders=2)
                for _ in range(2)]  # two workers
    for courier in couriers:
        courier.lease_seconds = 5  # shorter than a batch takes here: it must be renewed
        courier.start()
    try:
        assert smtp.wait_for(20, timeout=90) == 20
        time.sleep(3)  # a duplicate would arrive now
    finally:
        for courier in couriers:
            courier.stop(timeout=10)
    assert smtp.recipients() == sorted(f'slow{number}@example.com' for number in range(20))


# --- The courier's threads ------------------------------------------------------------------

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
    smtp.delay = 0.3
    courier.start()
    assert wait_until(lambda: Outbox.select().where(Outbox.claim != '').count() == 3, 5)
    courier.stop()
    assert 0 < Outbox.select().count()  # not all were sent
    assert Outbox.select().where(Outbox.claim != '').count() == 0
    assert Outbox.claim_due('next', now=time.time(), lease=60, limit=10)


# --- Personal data: the mail follows the person ---------------------------------------------

def test_no_mail_after_the_person_is_deleted(client, courier, smtp):
    person_id = register(client)['id']
    client.delete(f'/person/{person_id}', status=204)
    assert Outbox.select().count() == 0
    assert courier.deliver_due() == 0
    assert smtp.received() == []


def test_a_pending_mail_follows_corrections_of_the_address_and_the_names(client, courier, smtp):
    person_id = register(client, email='tpyo@example.com')['id']
    client.patch_json(f'/person/{person_id}', {'email': 'typo@example.com', 'first_name': 'Augusta'})
    client.patch_json(f'/person/{person_id}', {'last_name': 'King'})
    courier.deliver_due()
    assert_one_faithful_mail(smtp, {'first_name': 'Augusta', 'last_name': 'King',
                                    'email': 'typo@example.com'})


def everything_stored():
    """Every value of every row of every table, as text."""
    return ' '.join(str(row) for table in models.db.get_tables()
                    for row in models.db.execute_sql(f'SELECT * FROM {table}').fetchall())


def test_no_table_holds_a_person_after_delivery_and_deletion(client, courier, smtp):
    person = register(client, first_name='Zenobia', last_name='Quillfeather',
                      email='zq.secret@example.com')
    courier.deliver_due()
    smtp.refuse['failing@example.com'] = '550 no such user'
    failing = register(client, first_name='Yolanda', last_name='Xerxesova',
                       email='failing@example.com')
    courier.deliver_due()
    for gone in (person, failing):
        client.delete(f"/person/{gone['id']}", status=204)
    stored = everything_stored()
    for secret in ('Zenobia', 'Quillfeather', 'zq.secret', 'Yolanda', 'Xerxesova', 'failing@',
                   models.email_key('zq.secret@example.com')):
        assert secret not in stored


def test_failed_mails_are_purged_after_their_retention(client, config, smtp):
    courier = Courier(Smtp('127.0.0.1', smtp.port), config.mail_from, failed_retention=0.5)
    smtp.refuse['ada@example.com'] = '550 no such user'
    register(client)
    courier.deliver_due()
    courier.housekeeping()
    assert queued_row().status == Outbox.FAILED  # kept while within the retention
    time.sleep(1)
    courier._next_purge = 0  # the next round's housekeeping, without waiting a minute
    courier.housekeeping()
    assert Outbox.select().count() == 0


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
    assert secure_smtp.recipients() == ['ada@example.com']


@pytest.mark.parametrize('trust, password', [(True, 'wrong'), (False, 's3cret')])
def test_a_bad_password_or_an_untrusted_certificate_sends_nothing_and_retries(
        client, config, secure_smtp, certificate, monkeypatch, trust, password, caplog):
    if trust:
        monkeypatch.setenv('SSL_CERT_FILE', str(certificate[0]))
    register(client)
    secure_courier(config, secure_smtp, username='mailer', password=password).deliver_due()
    assert secure_smtp.received() == []
    assert queued_row().status == Outbox.PENDING and queued_row().attempts == 1
    assert any(r.levelno == logging.ERROR and 'SMTP relay' in r.getMessage()
               for r in caplog.records)


# --- Operator commands ----------------------------------------------------------------------

def mailer_command(database_url, smtp, *args):
    models.db.close()
    env = {**os.environ, 'DATABASE_URL': database_url, 'SMTP_HOST': '127.0.0.1',
           'SMTP_PORT': str(smtp.port)}
    result = subprocess.run([sys.executable, 'mailer.py', *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_mailer_once_delivers_what_is_due_and_exits(client, database_url, smtp):
    for number in range(3):
        register(client, email=f'person{number}@example.com')
    assert '3 mail(s) handled' in mailer_command(database_url, smtp, '--once')
    assert smtp.recipients() == [f'person{number}@example.com' for number in range(3)]
    assert Outbox.select().count() == 0


def test_an_operator_sees_and_resends_failed_mail(client, courier, database_url, smtp):
    for name in ('one', 'two', 'three'):
        register(client, email=f'{name}@example.com')
    smtp.refuse = {'one@example.com': '550 no such user', 'two@example.com': '550 no such user'}
    courier.deliver_due()
    status = mailer_command(database_url, smtp, 'status')
    assert 'pending: 0' in status and 'failed: 2' in status
    failed = mailer_command(database_url, smtp, 'failed').splitlines()
    assert len(failed) == 3  # a heading and the two mails
    assert all('SMTPRecipientsRefused 550' in line for line in failed[1:])
    first_id = int(failed[1].split('\t')[0])
    assert 'one@example.com' in failed[1] and 'two@example.com' in failed[2]

    smtp.refuse = {}
    courier.start()  # the running service
    try:
        assert '1 failed mail(s)' in mailer_command(database_url, smtp, 'retry', str(first_id))
        assert smtp.wait_for(2, timeout=15) == 2
        assert '1 failed mail(s)' in mailer_command(database_url, smtp, 'retry', '--all')
        assert smtp.wait_for(3, timeout=15) == 3
    finally:
        courier.stop()
    assert smtp.recipients() == ['one@example.com', 'three@example.com', 'two@example.com']
    assert 'pending: 0' in mailer_command(database_url, smtp, 'status')


@pytest.mark.parametrize('args', [[], ['retry'], ['retry', '1', '--all'], ['bogus']])
def test_a_wrong_operator_command_says_how_to_call_it(args):
    result = subprocess.run([sys.executable, 'mailer.py', *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 2 and 'usage:' in result.stderr

"""Welcome mail: queued in the outbox with its person, delivered over SMTP in the background.

Each worker runs a Courier: MAIL_CONCURRENCY sender threads that claim due rows with a
lease held in the database, so any number of workers and replicas send each mail once.
The message is built as bytes from a fixed template: no user text is ever parsed as
header syntax, and the envelope is given to smtplib, never derived from a header.

Operator commands (`python mailer.py --help`): `status`, `failed`, `retry ID... | --all`,
and `--once`, which delivers what is due and exits.
"""

import argparse
import base64
import contextlib
import email.utils
import logging
import random
import smtplib
import ssl
import sys
import threading
import time
import traceback
import unicodedata
import uuid

import idna
import peewee

import config
import metrics
import models
from models import Outbox, Person, db

log = logging.getLogger('personapi.mailer')

# Mails claimed at once; small, so that their bookkeeping holds SQLite's write lock briefly.
# A sender that claims a full batch calls another to share the rest of the backlog, so a
# slow relay gets several sessions.
BATCH_SIZE = 10
LEASE_MAILS = 5  # mails a lease has room for: it is renewed as it runs short
POLL_SECONDS = 5.0  # without a wake-up, look for due mail (other replicas', retries) this often
FIRST_RETRY_SECONDS = 1.0
GATHER_SECONDS = 0.1
PURGE_EVERY_SECONDS = 60.0
# The replies one mail waits for (MAIL, RCPT, DATA, end of data) and one to spare: the
# lease always has this many SMTP_TIMEOUTs left before a mail starts, so no mail the server
# accepted can be claimed and sent again by another sender.
REPLIES_PER_MAIL = 5
REPLIES_PER_SESSION = 8  # greeting, EHLO, STARTTLS, EHLO, AUTH (two steps), QUIT, spare
# Control characters, lone surrogates, line and paragraph separators: each could end a
# mail header early (header injection) or break the database's encoding.
CONTROL_CATEGORIES = frozenset({'Cc', 'Cs', 'Zl', 'Zp'})
ENCODED_WORD_BYTES = 42  # of UTF-8 per RFC 2047 word: `Subject: ` and one word fit in 78
MAX_PLAIN_HEADER = 78


class PermanentFailure(Exception):
    """This mail can never be sent as it is: retrying would not help."""


def enqueue_welcome(person_id):
    """Queue the welcome mail of the person `person_id`; call it inside the transaction
    that creates them."""
    models.insert(Outbox, person=person_id)


def has_control_characters(text):
    return any(unicodedata.category(char) in CONTROL_CATEGORIES for char in text)


def looks_encoded(text):
    """True for text a mail client could take for an RFC 2047 encoded word."""
    return '=?' in text


# --- The message ------------------------------------------------------------------------------

def header_text(text):
    """`text` as a header value that any parser reads back as exactly `text`: as it is
    when it is short printable ASCII that cannot be taken for an encoded word, else as
    RFC 2047 base64 encoded words of whole characters, one per folded line."""
    if has_control_characters(text):
        raise PermanentFailure('control character in a header value')
    if text.isascii() and text.isprintable() and not looks_encoded(text) \
            and len(text) <= MAX_PLAIN_HEADER - len('Subject: '):
        return text
    words, chunk = [], b''
    for char in text:
        encoded = char.encode()
        if len(chunk) + len(encoded) > ENCODED_WORD_BYTES:
            words.append(chunk)
            chunk = b''
        chunk += encoded
    words.append(chunk)
    return '\r\n '.join(f'=?utf-8?b?{base64.b64encode(word).decode()}?=' for word in words)


def _body(text):
    """(Content-Transfer-Encoding, body): 7bit for ASCII, else base64, which every server takes."""
    text = text.replace('\n', '\r\n')
    if text.isascii():
        return '7bit', text
    encoded = base64.encodebytes(text.encode()).decode().replace('\n', '\r\n')
    return 'base64', encoded


def envelope_recipient(address, smtputf8):
    """(RCPT TO address, SMTP options) for a stored address: the domain in its ASCII form
    unless the server takes UTF-8; a non-ASCII local part needs SMTPUTF8."""
    if looks_encoded(address) or has_control_characters(address) or ' ' in address:
        raise PermanentFailure('address unsafe in a header')
    local, _, domain = address.rpartition('@')
    if not local.isascii():
        if not smtputf8:
            raise PermanentFailure('recipient needs SMTPUTF8')
        return address, ('SMTPUTF8',)
    if domain.isascii():
        return address, ()
    if smtputf8:
        return address, ('SMTPUTF8',)
    try:
        return f'{local}@{idna.encode(domain, uts46=True).decode()}', ()
    except idna.IDNAError:
        raise PermanentFailure('domain has no ASCII form') from None


class Letter:
    """The welcome message as bytes: fixed headers built once, the person's parts per mail."""

    def __init__(self, mail_from):
        name, self.sender = config.parse_mail_from(mail_from)
        self.domain = self.sender.rpartition('@')[2]
        self._from = email.utils.formataddr((name, self.sender)) if name else self.sender
        self._date = (None, '')  # (second, Date header of that second), replaced as one

    def _date_header(self):
        """The Date header, made once a second: formatting it costs more than the rest."""
        second, text = self._date
        now = int(time.time())
        if now != second:
            text = email.utils.formatdate(now, usegmt=True)
            self._date = (now, text)
        return text

    def compose(self, person, recipient):
        """The message for `person` (current names) to the envelope address `recipient`."""
        full_name = f'{person.first_name} {person.last_name}'
        encoding, body = _body(f'Hello {full_name},\n\nyou are now registered with the '
                               'Person API.\n')
        head = (f'From: {self._from}\r\n'
                f'To: {recipient}\r\n'
                f'Subject: {header_text(f"Welcome, {full_name}!")}\r\n'
                f'Date: {self._date_header()}\r\n'
                f'Message-ID: <{uuid.uuid4().hex}@{self.domain}>\r\n'
                'MIME-Version: 1.0\r\n'
                'Content-Type: text/plain; charset=utf-8\r\n'
                f'Content-Transfer-Encoding: {encoding}\r\n\r\n')
        return (head + body).encode()


# --- SMTP -------------------------------------------------------------------------------------

class Smtp:
    """Opens SMTP sessions as configured: STARTTLS (certificate verified) and login if set."""

    def __init__(self, host, port, *, timeout=10.0, starttls=False, username='', password=''):
        self.host, self.port, self.timeout = host, port, timeout
        self.username, self.password = username, password
        # Built once: loading the CA store costs tens of milliseconds, every session alike.
        self.tls = ssl.create_default_context() if starttls else None

    @classmethod
    def from_config(cls, config):
        return cls(config.smtp_host, config.smtp_port, timeout=config.smtp_timeout,
                   starttls=config.smtp_starttls, username=config.smtp_username,
                   password=config.smtp_password)

    @contextlib.contextmanager
    def session(self):
        """A session ready to send: greeted, EHLO done (its extensions known), secured."""
        smtp = smtplib.SMTP(self.host, self.port, timeout=self.timeout)
        try:
            smtp.ehlo_or_helo_if_needed()
            if self.tls:
                smtp.starttls(context=self.tls)
                smtp.ehlo()
            if self.username:
                smtp.login(self.username, self.password)
            yield smtp
        finally:
            _quit_quietly(smtp)


def _quit_quietly(smtp):
    """End a session whose mails are all settled: how the relay answers QUIT changes nothing."""
    try:
        smtp.quit()
    except (OSError, smtplib.SMTPException):
        smtp.close()


class RelayFailure(Exception):
    """The relay refused or lost the session (not one mail): every mail in hand waits."""


def _refusal_code(error):
    """The reply code that refused this one mail (the recipient's, or DATA's)."""
    if isinstance(error, smtplib.SMTPRecipientsRefused):
        return max(code for code, _ in error.recipients.values())
    return error.smtp_code


class Courier:
    """Delivers the outbox: woken after each commit, polling rarely otherwise."""

    def __init__(self, smtp, mail_from, *, max_backoff=60.0, senders=1, give_up_after=3 * 86400,
                 failed_retention=7 * 86400):
        self.smtp, self.letter, self.max_backoff = smtp, Letter(mail_from), max_backoff
        self.senders, self.give_up_after = senders, give_up_after
        self.failed_retention = failed_retention
        self.lease_seconds = (REPLIES_PER_SESSION + REPLIES_PER_MAIL * LEASE_MAILS) * smtp.timeout
        self._wake = threading.Condition()
        self._woken = False  # a commit since a sender last looked; guarded by _wake
        self._delivering = 0  # senders in a delivery round; guarded by _wake
        self._stopping = threading.Event()
        self._threads = []
        self._next_purge = 0.0

    @classmethod
    def from_config(cls, config):
        return cls(Smtp.from_config(config), config.mail_from,
                   max_backoff=config.mail_max_backoff, senders=config.mail_concurrency,
                   give_up_after=config.mail_give_up_after,
                   failed_retention=config.mail_failed_retention)

    # --- lifecycle -----------------------------------------------------------------------

    def start(self):
        """Start the sender threads, each with its own SMTP session; call it in each worker,
        after the fork. Several sessions keep up with a slow SMTP server."""
        self._stopping.clear()
        self._threads = [threading.Thread(target=self._run, name=f'courier-{n}', daemon=True)
                         for n in range(self.senders)]
        for thread in self._threads:
            thread.start()

    @property
    def running(self):
        return any(thread.is_alive() for thread in self._threads)

    def wake(self):
        """A mail was queued (and committed): one sender goes to look, unless one is already
        delivering, whose next claim takes the mail; the flag makes it look again after."""
        with self._wake:
            self._woken = True
            if not self._delivering:
                self._wake.notify()

    def _call_for_help(self):
        """A full batch was claimed: more may be due, and an idle sender may share it."""
        with self._wake:
            self._wake.notify()

    @contextlib.contextmanager
    def _delivery_round(self):
        with self._wake:
            self._delivering += 1
        try:
            yield
        finally:
            with self._wake:
                self._delivering -= 1

    def stop(self, timeout=None):
        """Finish the mails in hand, give the rest of the batches back, end the threads."""
        self._stopping.set()
        with self._wake:
            self._wake.notify_all()
        deadline = time.monotonic() + (timeout if timeout is not None else self.smtp.timeout + 5)
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _run(self):
        while not self._stopping.is_set():
            try:
                models.skip_fsync_on_this_connection()
                self.housekeeping()
                with self._delivery_round():
                    self.deliver_due()
                pause = self._seconds_until_due()
            except Exception as error:
                log.error('mail delivery round failed: %s', describe_unexpected(error))
                if isinstance(error, peewee.PeeweeException):
                    metrics.DATABASE_ERRORS.inc()
                _close_quietly()  # reconnect on the next round: the database may be back
                pause = FIRST_RETRY_SECONDS
            if self._wait_for_work(pause):
                # Let the commits of the next moment join this one's batch: one SMTP
                # session and one claim for many mails, not one each.
                self._stopping.wait(GATHER_SECONDS)
        _close_quietly()

    def _wait_for_work(self, pause):
        """Wait until woken (True) or `pause` seconds pass (False)."""
        with self._wake:
            if not self._woken and not self._stopping.is_set():
                self._wake.wait(pause)
            woken, self._woken = self._woken, False
        return woken

    def _seconds_until_due(self):
        due_at = Outbox.next_due_at()
        return POLL_SECONDS if due_at is None else min(POLL_SECONDS, max(0.0, due_at - time.time()))

    def housekeeping(self):
        """At most once a minute: purge failed mails past their retention, and finish any
        erasure whose traces the database still holds."""
        now = time.time()
        if now < self._next_purge:
            return
        self._next_purge = now + PURGE_EVERY_SECONDS
        Outbox.purge_failed(now - self.failed_retention)
        models.finish_erasures()

    # --- delivery ------------------------------------------------------------------------

    def deliver_due(self):
        """Send due mail until none is left: batch after batch on one SMTP session, opened
        only if there is mail. Returns how many mails were handled."""
        handled = 0
        with contextlib.ExitStack() as session:
            smtp = None
            while not self._stopping.is_set():
                batch = self._claim()
                if batch is None:
                    break
                handled += batch.size
                if batch.size == BATCH_SIZE:
                    self._call_for_help()
                try:
                    smtp = smtp or session.enter_context(self.smtp.session())
                    self._send_batch(smtp, batch)
                except (OSError, smtplib.SMTPException, RelayFailure) as error:
                    self._relay_failed(batch, error)
                    break
                finally:
                    # One write for the batch's sent mails: the lease covers them until then.
                    Outbox.settle(batch.claim, sent=batch.sent)
                    Outbox.release(batch.claim, [row.id for row in batch.unsent])
                if batch.size < BATCH_SIZE:
                    break
        return handled

    def _claim(self):
        now = time.time()
        rows = Outbox.claim_due(uuid.uuid4().hex, now=now, lease=self.lease_seconds,
                                limit=BATCH_SIZE)
        return _Batch(rows, lease_end=now + self.lease_seconds) if rows else None

    def _send_batch(self, smtp, batch):
        while batch.unsent and not self._stopping.is_set():
            self._keep_lease(batch)
            self._send(smtp, batch)

    def _relay_failed(self, batch, error):
        cause = error.__cause__ if isinstance(error, RelayFailure) else error
        log.error('SMTP relay %s:%s failed (%s); %d mail(s) wait for the next try',
                  self.smtp.host, self.smtp.port, describe(cause), len(batch.unsent))
        for row in batch.unsent:
            self._retry(row, cause)
        batch.unsent = []

    def _keep_lease(self, batch):
        """Before each mail: the lease must outlast it, or another sender could resend it."""
        now = time.time()
        if batch.lease_end - now < REPLIES_PER_MAIL * self.smtp.timeout:
            batch.lease_end = now + self.lease_seconds
            Outbox.settle(batch.claim, sent=batch.sent, extend_to=batch.lease_end)
            batch.sent = []

    def _send(self, smtp, batch):
        """Send the batch's next mail; a refusal of this mail is settled here, a failure of
        the relay raises RelayFailure."""
        row = batch.unsent.pop(0)
        try:
            recipient, options = envelope_recipient(row.email, smtp.has_extn('smtputf8'))
            message = self.letter.compose(row, recipient)
        except PermanentFailure as error:
            return self._give_up(row, str(error))
        except Exception as error:  # a row no message can be made of must not jam the rest
            return self._give_up(row, describe_unexpected(error))
        try:
            smtp.sendmail(self.letter.sender, [recipient], message, mail_options=options)
        except (smtplib.SMTPRecipientsRefused, smtplib.SMTPDataError) as error:
            if _refusal_code(error) >= 500:
                return self._give_up(row, describe(error))
            return self._retry(row, error)
        except (OSError, smtplib.SMTPException) as error:  # MAIL FROM refused, connection lost
            batch.unsent.insert(0, row)
            raise RelayFailure() from error
        except Exception as error:  # this mail's own: settle it, and resynchronise the session
            self._give_up(row, describe_unexpected(error))
            return smtp.rset()
        batch.sent.append(row.id)
        metrics.MAIL_DELIVERIES.labels('sent').inc()

    def _give_up(self, row, reason):
        log.error('mail %d failed for good: %s', row.id, reason)
        metrics.MAIL_DELIVERIES.labels('failed').inc()
        Outbox.mark_failed(row.id, reason)

    def _retry(self, row, error):
        if time.time() - row.created_at >= self.give_up_after:
            return self._give_up(row, f'gave up after {row.attempts} attempts: {describe(error)}')
        Outbox.reschedule(row.id, time.time() + self.backoff(row.attempts), describe(error))
        metrics.MAIL_DELIVERIES.labels('retried').inc()

    def backoff(self, attempts):
        """Exponential in the attempts made, capped, with jitter so workers do not stampede."""
        doublings = min(max(0, attempts - 1), 32)  # 2**32 s is past any cap: no overflow
        ceiling = min(self.max_backoff, FIRST_RETRY_SECONDS * 2 ** doublings)
        return random.uniform(ceiling / 2, ceiling)


class _Batch:
    """The mails of one claim: those still to send, and those sent but not yet recorded."""

    def __init__(self, rows, lease_end):
        self.claim, self.size, self.lease_end = rows[0].claim, len(rows), lease_end
        self.unsent, self.sent = list(rows), []


def _close_quietly():
    try:
        db.close()
    except peewee.PeeweeException:
        pass


def describe(error):
    """An SMTP error as its type and reply code: never the reply text, which may quote the
    address."""
    code = getattr(error, 'smtp_code', None)
    if isinstance(error, smtplib.SMTPRecipientsRefused):
        code = _refusal_code(error)
    return f'{type(error).__name__} {code}' if code else type(error).__name__


def describe_unexpected(error):
    """An unexpected error as its type and where it was raised, without its message, which
    may hold personal data."""
    frame = traceback.extract_tb(error.__traceback__)[-1] if error.__traceback__ else None
    where = f' at {frame.filename.rpartition("/")[2]}:{frame.lineno} in {frame.name}' if frame else ''
    return f'{type(error).__name__}{where}'


# --- Operator commands ------------------------------------------------------------------------

def queue_status(now=None):
    """{'pending', 'failed': counts, 'oldest_pending_age': seconds or None}."""
    now = time.time() if now is None else now
    counts = dict(Outbox.select(Outbox.status, peewee.fn.COUNT(Outbox.id)).group_by(
        Outbox.status).tuples())
    oldest = Outbox.select(peewee.fn.MIN(Outbox.created_at)).where(
        Outbox.status == Outbox.PENDING).scalar()
    return {'pending': counts.get(Outbox.PENDING, 0), 'failed': counts.get(Outbox.FAILED, 0),
            'oldest_pending_age': None if oldest is None else max(0.0, now - oldest)}


def _when(timestamp):
    return time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(timestamp))


def print_status():
    status = queue_status()
    age = status['oldest_pending_age']
    print(f"pending: {status['pending']}")
    print(f"failed: {status['failed']}")
    print('oldest pending: ' + ('none' if age is None else f'{age:.0f} s'))


def print_failed():
    rows = Outbox.select(Outbox, Person).join(Person).where(
        Outbox.status == Outbox.FAILED).order_by(Outbox.id)
    print('id\taddress\treason\tattempts\tfailed at')
    for row in rows:
        print(f'{row.id}\t{row.person.email}\t{row.last_error}\t{row.attempts}\t'
              f'{_when(row.failed_at)}')


def retry(ids, every):
    count = Outbox.retry_failed(None if every else ids)
    print(f'{count} failed mail(s) made pending again')


def _parser():
    parser = argparse.ArgumentParser(prog='python mailer.py', description='The mail outbox.')
    parser.add_argument('--once', action='store_true', help='deliver what is due, then exit')
    commands = parser.add_subparsers(dest='command')
    commands.add_parser('status', help='mails per state, age of the oldest pending mail')
    commands.add_parser('failed', help='each failed mail: id, address, reason, attempts, when')
    again = commands.add_parser('retry', help='make failed mails pending again')
    again.add_argument('ids', nargs='*', type=int, metavar='ID')
    again.add_argument('--all', action='store_true', help='every failed mail')
    return parser


def deliver_once(config):
    print(f'{Courier.from_config(config).deliver_due()} mail(s) handled')


def main(argv):
    parser = _parser()
    args = parser.parse_args(argv[1:])
    if args.command == 'retry' and bool(args.ids) == args.all:
        parser.error('retry takes ids or --all')
    if not args.once and not args.command:
        parser.error('name a command, or --once')
    logging.basicConfig(level=logging.INFO)
    settings = config.Config.from_env_or_exit()
    models.connect(settings.database_url)
    if args.once:
        deliver_once(settings)
    elif args.command == 'status':
        print_status()
    elif args.command == 'failed':
        print_failed()
    else:
        retry(args.ids, args.all)


if __name__ == '__main__':
    main(sys.argv)

"""Welcome mail: queued in the outbox with its person, delivered over SMTP in the background.

Each worker runs a Courier: MAIL_CONCURRENCY sender threads that claim due rows with a
lease held in the database, so any number of workers and replicas send each mail once.
`python mailer.py --once` delivers what is due and exits.
"""

import contextlib
import email.message
import email.policy
import email.utils
import logging
import random
import smtplib
import ssl
import sys
import threading
import time
import unicodedata
import uuid

import peewee

import metrics
import models
from models import Outbox, db

log = logging.getLogger('personapi.mailer')

BATCH_SIZE = 10  # mails per SMTP session; small, so that several senders share a backlog
POLL_SECONDS = 10.0  # without a wake-up, look for due mail (other replicas', retries) this often
FIRST_RETRY_SECONDS = 1.0
GATHER_SECONDS = 0.1
# Control characters, lone surrogates, line and paragraph separators: each could end a
# mail header early (header injection) or break the database's encoding.
CONTROL_CATEGORIES = frozenset({'Cc', 'Cs', 'Zl', 'Zp'})


class PermanentFailure(Exception):
    """This mail can never be sent as it is: retrying would not help."""


def enqueue_welcome(person):
    """Queue the welcome mail of `person` (its fields, cleaned); call it inside the
    transaction that creates them."""
    models.insert(Outbox, recipient=person['email'], first_name=person['first_name'],
                  last_name=person['last_name'])


def has_control_characters(text):
    return any(unicodedata.category(char) in CONTROL_CATEGORIES for char in text)


def _header_text(text):
    # The API already refuses such names; a header is still never built without this check.
    if has_control_characters(text):
        raise PermanentFailure('control character in a header value')
    return text


def compose(row, mail_from):
    """The welcome message for an outbox row: plain text, which every client shows well.

    `mail_from` is a From header as a string, or parsed once by `from_header()`.
    """
    full_name = _header_text(f'{row.first_name} {row.last_name}')
    message = email.message.EmailMessage()
    message['From'] = mail_from
    message['To'] = _header_text(row.recipient)
    message['Subject'] = f'Welcome, {full_name}!'
    message['Date'] = email.utils.formatdate(localtime=False)
    message['Message-ID'] = email.utils.make_msgid(domain='personapi.local')
    message.set_content(f'Hello {full_name},\n\nyou are now registered with the Person API.\n')
    return message


def from_header(mail_from):
    """MAIL_FROM parsed once: parsing an address header costs more than sending the mail."""
    return email.policy.default.header_factory('From', _header_text(mail_from))


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
        with smtplib.SMTP(self.host, self.port, timeout=self.timeout) as smtp:
            if self.tls:
                smtp.starttls(context=self.tls)
            if self.username:
                smtp.login(self.username, self.password)
            yield smtp


def _is_permanent(error):
    if isinstance(error, smtplib.SMTPRecipientsRefused):
        return all(code >= 500 for code, _ in error.recipients.values())
    if isinstance(error, smtplib.SMTPNotSupportedError):
        return True  # e.g. an internationalised address the server cannot take
    return isinstance(error, smtplib.SMTPResponseException) and error.smtp_code >= 500


class Courier:
    """Delivers the outbox: woken after each commit, polling rarely otherwise."""

    def __init__(self, smtp, mail_from, *, max_backoff=60.0, senders=1, lease_seconds=None):
        self.smtp, self.mail_from, self.max_backoff = smtp, from_header(mail_from), max_backoff
        self.senders = senders
        # Longer than one batch can take against a server that stalls every reply.
        self.lease_seconds = lease_seconds or 2 * BATCH_SIZE * smtp.timeout
        self._wake = threading.Condition()
        self._woken = False  # a commit since a sender last looked; guarded by _wake
        self._stopping = threading.Event()
        self._threads = []

    @classmethod
    def from_config(cls, config):
        return cls(Smtp.from_config(config), config.mail_from,
                   max_backoff=config.mail_max_backoff, senders=config.mail_concurrency)

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
        """A mail was queued: one sender (not all of them) goes to look."""
        with self._wake:
            self._woken = True
            self._wake.notify()

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
                while self.deliver_due() == BATCH_SIZE and not self._stopping.is_set():
                    pass
                pause = self._seconds_until_due()
            except Exception as error:
                log.exception('mail delivery round failed')
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

    # --- delivery ------------------------------------------------------------------------

    def deliver_due(self):
        """Claim and send one batch of due mail on one SMTP session; returns its size."""
        claim = uuid.uuid4().hex
        rows = Outbox.claim_due(claim, now=time.time(), lease=self.lease_seconds,
                                limit=BATCH_SIZE)
        if not rows:
            return 0
        sent, unsent = [], list(rows)
        try:
            with self.smtp.session() as smtp:
                while unsent and not self._stopping.is_set():
                    if self._send(smtp, unsent[0]):
                        sent.append(unsent[0].id)
                    unsent.pop(0)
        except (OSError, smtplib.SMTPException) as error:
            log.warning('SMTP unavailable (%s); %d mail(s) will be retried',
                        type(error).__name__, len(unsent))
            for row in unsent:
                self._retry(row, error)
            unsent = []
        finally:
            # One write for the batch: a crash before it resends these mails, once each.
            Outbox.mark_sent(sent)
        Outbox.release(claim, [row.id for row in unsent])
        return len(rows)

    def _send(self, smtp, row):
        """Send one mail; True if the server took it. A refusal is settled here."""
        try:
            smtp.send_message(compose(row, self.mail_from))
            metrics.MAIL_DELIVERIES.labels('sent').inc()
            return True
        except PermanentFailure as error:
            self._give_up(row, error)
        except (smtplib.SMTPRecipientsRefused, smtplib.SMTPSenderRefused,
                smtplib.SMTPDataError, smtplib.SMTPNotSupportedError) as error:
            if _is_permanent(error):
                self._give_up(row, error)
            else:
                self._retry(row, error)
        return False

    def _give_up(self, row, error):
        log.error('mail %d permanently rejected: %s', row.id, _describe(error))
        metrics.MAIL_DELIVERIES.labels('failed').inc()
        Outbox.mark_failed(row.id, _describe(error))

    def _retry(self, row, error):
        Outbox.reschedule(row.id, time.time() + self._backoff(row.attempts), _describe(error))
        metrics.MAIL_DELIVERIES.labels('retried').inc()

    def _backoff(self, attempts):
        """Exponential in the attempts made, capped, with jitter so workers do not stampede."""
        ceiling = min(self.max_backoff, FIRST_RETRY_SECONDS * 2 ** max(0, attempts - 1))
        return random.uniform(ceiling / 2, ceiling)


def _close_quietly():
    try:
        db.close()
    except peewee.PeeweeException:
        pass


def _describe(error):
    code = getattr(error, 'smtp_code', None)
    return f'{type(error).__name__} {code}' if code else type(error).__name__


def queue_status():
    """Mails pending and failed, and the age in seconds of the oldest pending one (None
    when none is pending; measured from its due time)."""
    counts = dict(Outbox.select(Outbox.status, peewee.fn.COUNT(Outbox.id))
                  .where(Outbox.status.in_([Outbox.PENDING, Outbox.FAILED]))
                  .group_by(Outbox.status).tuples())
    oldest = Outbox.next_due_at()
    return {'pending': counts.get(Outbox.PENDING, 0), 'failed': counts.get(Outbox.FAILED, 0),
            'oldest_pending_age': None if oldest is None else max(0.0, time.time() - oldest)}


def main(argv):
    if argv[1:] != ['--once']:
        sys.exit('usage: python mailer.py --once')
    from config import Config

    logging.basicConfig(level=logging.INFO)
    config = Config.from_env()
    models.connect(config.database_url)
    courier = Courier.from_config(config)
    sent = 0
    while (batch := courier.deliver_due()):
        sent += batch
        if batch < BATCH_SIZE:
            break
    print(f'{sent} mail(s) handled')


if __name__ == '__main__':
    main(sys.argv)

"""Welcome mail: queued in the outbox with its person, delivered over SMTP in the background.

Each worker runs one Courier thread. Couriers claim due rows with a lease held in the
database, so any number of workers and replicas send each mail once. `python mailer.py
--once` delivers what is due and exits.
"""

import contextlib
import email.message
import email.utils
import html
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

import models
from models import Outbox, db

log = logging.getLogger('personapi.mailer')

BATCH_SIZE = 20
POLL_SECONDS = 10.0  # without a wake-up, look for due mail (other replicas', retries) this often
FIRST_RETRY_SECONDS = 1.0
# Control characters, lone surrogates, line and paragraph separators: each could end a
# mail header early (header injection) or break the database's encoding.
CONTROL_CATEGORIES = frozenset({'Cc', 'Cs', 'Zl', 'Zp'})


class PermanentFailure(Exception):
    """This mail can never be sent as it is: retrying would not help."""


def enqueue_welcome(person):
    """Queue `person`'s welcome mail; call it inside the transaction that creates them."""
    Outbox.create(recipient=person.email, first_name=person.first_name,
                  last_name=person.last_name)


def has_control_characters(text):
    return any(unicodedata.category(char) in CONTROL_CATEGORIES for char in text)


def _header_text(text):
    # The API already refuses such names; a header is still never built without this check.
    if has_control_characters(text):
        raise PermanentFailure('control character in a header value')
    return text


def compose(row, mail_from):
    """The welcome message for an outbox row."""
    full_name = _header_text(f'{row.first_name} {row.last_name}')
    message = email.message.EmailMessage()
    message['From'] = mail_from
    message['To'] = _header_text(row.recipient)
    message['Subject'] = f'Welcome, {full_name}!'
    message['Date'] = email.utils.formatdate(localtime=False)
    message['Message-ID'] = email.utils.make_msgid(domain='personapi.local')
    message.set_content(f'Hello {full_name},\n\nyou are now registered with the Person API.\n')
    message.add_alternative(f'<p>Hello {html.escape(full_name)},</p>'
                            '<p>you are now registered with the Person API.</p>',
                            subtype='html')
    return message


class Smtp:
    """Opens SMTP sessions as configured: STARTTLS (certificate verified) and login if set."""

    def __init__(self, host, port, *, timeout=10.0, starttls=False, username='', password=''):
        self.host, self.port, self.timeout = host, port, timeout
        self.starttls, self.username, self.password = starttls, username, password

    @classmethod
    def from_config(cls, config):
        return cls(config.smtp_host, config.smtp_port, timeout=config.smtp_timeout,
                   starttls=config.smtp_starttls, username=config.smtp_username,
                   password=config.smtp_password)

    @contextlib.contextmanager
    def session(self):
        with smtplib.SMTP(self.host, self.port, timeout=self.timeout) as smtp:
            if self.starttls:
                smtp.starttls(context=ssl.create_default_context())
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

    def __init__(self, smtp, mail_from, *, max_backoff=60.0, lease_seconds=None):
        self.smtp, self.mail_from, self.max_backoff = smtp, mail_from, max_backoff
        # Longer than one batch can take against a server that stalls every reply.
        self.lease_seconds = lease_seconds or 2 * BATCH_SIZE * smtp.timeout
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = None

    @classmethod
    def from_config(cls, config):
        return cls(Smtp.from_config(config), config.mail_from,
                   max_backoff=config.mail_max_backoff)

    # --- lifecycle -----------------------------------------------------------------------

    def start(self):
        """Start the delivery thread; call it in each worker, after the fork."""
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name='courier', daemon=True)
        self._thread.start()

    def wake(self):
        self._wake.set()

    def stop(self, timeout=None):
        """Finish the mail in hand, give the rest of the batch back, and end the thread."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout if timeout is not None else self.smtp.timeout + 5)

    def _run(self):
        while not self._stopping.is_set():
            self._wake.clear()
            try:
                models.skip_fsync_on_this_connection()
                while self.deliver_due() == BATCH_SIZE and not self._stopping.is_set():
                    pass
                pause = self._seconds_until_due()
            except Exception:
                log.exception('mail delivery round failed')
                _close_quietly()  # reconnect on the next round: the database may be back
                pause = FIRST_RETRY_SECONDS
            self._wake.wait(pause)
        _close_quietly()

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
        pending = list(rows)
        try:
            with self.smtp.session() as smtp:
                while pending and not self._stopping.is_set():
                    self._send(smtp, pending[0])
                    pending.pop(0)
        except (OSError, smtplib.SMTPException) as error:
            log.warning('SMTP unavailable (%s); %d mail(s) will be retried',
                        type(error).__name__, len(pending))
            for row in pending:
                self._retry(row, error)
        else:
            Outbox.release(claim, [row.id for row in pending])
        return len(rows)

    def _send(self, smtp, row):
        try:
            smtp.send_message(compose(row, self.mail_from))
        except PermanentFailure as error:
            self._give_up(row, error)
        except (smtplib.SMTPRecipientsRefused, smtplib.SMTPSenderRefused,
                smtplib.SMTPDataError, smtplib.SMTPNotSupportedError) as error:
            if _is_permanent(error):
                self._give_up(row, error)
            else:
                self._retry(row, error)
        else:
            Outbox.mark_sent(row.id)

    def _give_up(self, row, error):
        log.error('mail %d permanently rejected: %s', row.id, _describe(error))
        Outbox.mark_failed(row.id, _describe(error))

    def _retry(self, row, error):
        Outbox.reschedule(row.id, time.time() + self._backoff(row.attempts), _describe(error))

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

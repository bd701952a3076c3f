"""Welcome mail: queued in the outbox with its person, delivered over SMTP in the background.

The outbox's delivery (threads, claims, leases, backoff, the operator's commands) is in
outbox.py; this module is what is particular to the welcome mail: its message, built as bytes
from a fixed template (no user text is ever parsed as header syntax), its envelope, given to
smtplib, never derived from a header, and the SMTP session that sends it.

Operator commands (`python mailer.py --help`): `status`, `failed`, `retry ID... | --all`,
and `--once`, which delivers what is due and exits.
"""

import base64
import contextlib
import email.utils
import logging
import smtplib
import ssl
import sys
import time
import unicodedata
import uuid

import idna

import config
import metrics
import models
import outbox
from models import Outbox

log = logging.getLogger('personapi.mailer')

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


def _refusal_code(error):
    """The reply code that refused this one mail (the recipient's, or DATA's)."""
    if isinstance(error, smtplib.SMTPRecipientsRefused):
        return max(code for code, _ in error.recipients.values())
    return error.smtp_code


class SmtpChannel:
    """The outbox's channel for the welcome mail: an SMTP session sends each mail as a
    Letter, and says what became of it (see outbox.py)."""

    name = 'mail'
    log = log
    deliveries = metrics.MAIL_DELIVERIES

    def __init__(self, smtp, letter):
        self.smtp, self.letter = smtp, letter
        self.where = f'SMTP relay {smtp.host}:{smtp.port}'
        self.timeout = smtp.timeout
        self.session_seconds = REPLIES_PER_SESSION * smtp.timeout
        self.item_seconds = REPLIES_PER_MAIL * smtp.timeout

    @contextlib.contextmanager
    def session(self):
        try:
            with self.smtp.session() as smtp:
                yield _MailSession(smtp, self.letter)
        except (OSError, smtplib.SMTPException) as error:
            raise outbox.ChannelDown(describe(error)) from None


class _MailSession:
    def __init__(self, smtp, letter):
        self.smtp, self.letter = smtp, letter

    def send(self, row):
        """Send the welcome mail of `row` (a ClaimedMail): a refusal of this mail is its
        outcome, a failure of the relay is DOWN."""
        try:
            recipient, options = envelope_recipient(row.email, self.smtp.has_extn('smtputf8'))
            message = self.letter.compose(row, recipient)
        except PermanentFailure as error:
            return outbox.Outcome(outbox.FAILED, str(error))
        except Exception as error:  # a row no message can be made of must not jam the rest
            return outbox.Outcome(outbox.FAILED, outbox.describe_unexpected(error))
        try:
            self.smtp.sendmail(self.letter.sender, [recipient], message, mail_options=options)
        except (smtplib.SMTPRecipientsRefused, smtplib.SMTPDataError) as error:
            if _refusal_code(error) >= 500:
                return outbox.Outcome(outbox.FAILED, describe(error))
            return outbox.Outcome(outbox.RETRY, describe(error))
        except (OSError, smtplib.SMTPException) as error:  # MAIL FROM refused, connection lost
            return outbox.Outcome(outbox.DOWN, describe(error))
        except Exception as error:  # this mail's own: fail it, and resynchronise the session
            with contextlib.suppress(OSError, smtplib.SMTPException):
                self.smtp.rset()  # if the session is lost, the next mail finds out
            return outbox.Outcome(outbox.FAILED, outbox.describe_unexpected(error))
        return outbox.Outcome(outbox.SENT)


class Courier(outbox.Courier):
    """The outbox's delivery of welcome mails, over SMTP."""

    def __init__(self, smtp, mail_from, **options):
        super().__init__(SmtpChannel(smtp, Letter(mail_from)), **options)

    @classmethod
    def from_config(cls, config):
        return cls(Smtp.from_config(config), config.mail_from,
                   max_backoff=config.mail_max_backoff, senders=config.mail_concurrency,
                   give_up_after=config.mail_give_up_after,
                   failed_retention=config.mail_failed_retention)


def describe(error):
    """An SMTP error as its type and reply code: never the reply text, which may quote the
    address."""
    code = getattr(error, 'smtp_code', None)
    if isinstance(error, smtplib.SMTPRecipientsRefused):
        code = _refusal_code(error)
    return f'{type(error).__name__} {code}' if code else type(error).__name__


def main(argv):
    outbox.main(argv, Courier.from_config, prog='python mailer.py', noun='mail')


if __name__ == '__main__':
    main(sys.argv)

"""The outbox's delivery, whatever it delivers: sender threads that claim due rows with a
lease held in the database, hand them to a channel, and settle each by its outcome (sent,
retried with backoff, given up); housekeeping; and the operator's view and commands.

A channel is what is particular to one kind of delivery (mailer.py: the welcome mail over
SMTP). It has
    name            what it delivers, for the logs ('mail')
    where           where it delivers to, for the logs ('SMTP relay host:port')
    log             the logger its deliveries are reported on
    deliveries      a counter labelled by result: sent, retried, failed
    timeout         seconds one reply of the far end may take
    session_seconds the longest opening and closing a session may take
    item_seconds    the longest one item may take on an open session
    session()       a context manager: an open session, or ChannelDown
and a session's send(item) returns the item's Outcome.
"""

import argparse
import collections
import contextlib
import logging
import random
import threading
import time
import traceback
import uuid

import peewee

import config
import metrics
import models
from models import Outbox, Person, db

# Rows claimed at once; small, so that their bookkeeping holds SQLite's write lock briefly.
# A sender that claims a full batch calls another to share the rest of the backlog, so a
# slow far end gets several sessions.
BATCH_SIZE = 10
LEASE_ITEMS = 5  # items a lease has room for: it is renewed as it runs short
POLL_SECONDS = 5.0  # without a wake-up, look for due rows (other replicas', retries) this often
FIRST_RETRY_SECONDS = 1.0
GATHER_SECONDS = 0.1
PURGE_EVERY_SECONDS = 60.0

SENT, RETRY, FAILED, DOWN = 'sent', 'retry', 'failed', 'down'


class Outcome(collections.namedtuple('Outcome', 'kind reason')):
    """What became of one item: SENT; RETRY later or FAILED for good, for `reason`; or the
    channel went DOWN before the item could be known to be sent (the item waits)."""

    def __new__(cls, kind, reason=''):
        return super().__new__(cls, kind, reason)


class ChannelDown(Exception):
    """The far end refused or lost the session (not one item): every item in hand waits.
    Its message says why, without personal data."""


class Courier:
    """Delivers the outbox over `channel`: woken after each commit, polling rarely otherwise."""

    def __init__(self, channel, *, max_backoff=60.0, senders=1, give_up_after=3 * 86400,
                 failed_retention=7 * 86400):
        self.channel, self.log, self.max_backoff = channel, channel.log, max_backoff
        self.senders, self.give_up_after = senders, give_up_after
        self.failed_retention = failed_retention
        self.lease_seconds = channel.session_seconds + LEASE_ITEMS * channel.item_seconds
        self._wake = threading.Condition()
        self._woken = False  # a commit since a sender last looked; guarded by _wake
        self._delivering = 0  # senders in a delivery round; guarded by _wake
        self._stopping = threading.Event()
        self._threads = []
        self._next_purge = 0.0

    # --- lifecycle -----------------------------------------------------------------------

    def start(self):
        """Start the sender threads, each with its own session; call it in each worker,
        after the fork. Several sessions keep up with a slow far end."""
        self._stopping.clear()
        self._threads = [threading.Thread(target=self._run, name=f'courier-{n}', daemon=True)
                         for n in range(self.senders)]
        for thread in self._threads:
            thread.start()

    @property
    def running(self):
        return any(thread.is_alive() for thread in self._threads)

    def wake(self):
        """A row was queued (and committed): one sender goes to look, unless one is already
        delivering, whose next claim takes the row; the flag makes it look again after."""
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
        """Finish the items in hand, give the rest of the batches back, end the threads."""
        self._stopping.set()
        with self._wake:
            self._wake.notify_all()
        deadline = time.monotonic() + (timeout if timeout is not None else self.channel.timeout + 5)
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
                if models.is_database_failure(error):  # logged once per change of write health
                    models.note_database_failure(error)
                else:
                    self.log.error('%s delivery round failed: %s', self.channel.name,
                                   describe_unexpected(error))
                if isinstance(error, peewee.PeeweeException):
                    metrics.DATABASE_ERRORS.inc()
                _close_quietly()  # reconnect on the next round: the database may be back
                pause = FIRST_RETRY_SECONDS
            if self._wait_for_work(pause):
                # Let the commits of the next moment join this one's batch: one session
                # and one claim for many rows, not one each.
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
        """At most once a minute: purge failed rows past their retention, and finish any
        erasure whose traces the database still holds."""
        now = time.time()
        if now < self._next_purge:
            return
        self._next_purge = now + PURGE_EVERY_SECONDS
        Outbox.purge_failed(now - self.failed_retention)
        models.finish_erasures()

    # --- delivery ------------------------------------------------------------------------

    def deliver_due(self):
        """Send due rows until none is left: batch after batch on one session, opened only
        if there is something to send. Returns how many rows were handled."""
        handled = 0
        with contextlib.ExitStack() as sessions:
            session = None
            while not self._stopping.is_set():
                batch = self._claim()
                if batch is None:
                    break
                handled += batch.size
                if batch.size == BATCH_SIZE:
                    self._call_for_help()
                try:
                    session = session or sessions.enter_context(self.channel.session())
                    self._send_batch(session, batch)
                except ChannelDown as error:
                    self._channel_failed(batch, str(error))
                    break
                finally:
                    # One write for the batch's sent rows: the lease covers them until then.
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

    def _send_batch(self, session, batch):
        while batch.unsent and not self._stopping.is_set():
            self._keep_lease(batch)
            self._send(session, batch)

    def _channel_failed(self, batch, reason):
        self.log.error('%s failed (%s); %d %s(s) wait for the next try', self.channel.where,
                       reason, len(batch.unsent), self.channel.name)
        for row in batch.unsent:
            self._retry(row, reason)
        batch.unsent = []

    def _keep_lease(self, batch):
        """Before each item: the lease must outlast it, or another sender could resend it."""
        now = time.time()
        if batch.lease_end - now < self.channel.item_seconds:
            batch.lease_end = now + self.lease_seconds
            Outbox.settle(batch.claim, sent=batch.sent, extend_to=batch.lease_end)
            batch.sent = []

    def _send(self, session, batch):
        """Send the batch's next item and settle it by its outcome; a channel gone down
        raises ChannelDown, with the item back in the batch."""
        row = batch.unsent.pop(0)
        outcome = session.send(row)
        if outcome.kind == DOWN:
            batch.unsent.insert(0, row)
            raise ChannelDown(outcome.reason)
        if outcome.kind == SENT:
            batch.sent.append(row.id)
            self.channel.deliveries.labels('sent').inc()
        elif outcome.kind == RETRY:
            self._retry(row, outcome.reason)
        else:
            self._give_up(row, outcome.reason)

    def _give_up(self, row, reason):
        self.log.error('%s %d failed for good: %s', self.channel.name, row.id, reason)
        self.channel.deliveries.labels('failed').inc()
        Outbox.mark_failed(row.id, reason)

    def _retry(self, row, reason):
        if time.time() - row.created_at >= self.give_up_after:
            return self._give_up(row, f'gave up after {row.attempts} attempts: {reason}')
        Outbox.reschedule(row.id, time.time() + self.backoff(row.attempts), reason)
        self.channel.deliveries.labels('retried').inc()

    def backoff(self, attempts):
        """Exponential in the attempts made, capped, with jitter so workers do not stampede."""
        doublings = min(max(0, attempts - 1), 32)  # 2**32 s is past any cap: no overflow
        ceiling = min(self.max_backoff, FIRST_RETRY_SECONDS * 2 ** doublings)
        return random.uniform(ceiling / 2, ceiling)


class _Batch:
    """The rows of one claim: those still to send, and those sent but not yet recorded."""

    def __init__(self, rows, lease_end):
        self.claim, self.size, self.lease_end = rows[0].claim, len(rows), lease_end
        self.unsent, self.sent = list(rows), []


def _close_quietly():
    try:
        db.close()
    except peewee.PeeweeException:
        pass


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


def retry(ids, every, noun):
    count = Outbox.retry_failed(None if every else ids)
    print(f'{count} failed {noun}(s) made pending again')


def _parser(prog, noun):
    parser = argparse.ArgumentParser(prog=prog, description=f'The {noun} outbox.')
    parser.add_argument('--once', action='store_true', help='deliver what is due, then exit')
    commands = parser.add_subparsers(dest='command')
    commands.add_parser('status', help=f'{noun}s per state, age of the oldest pending {noun}')
    commands.add_parser('failed', help=f'each failed {noun}: id, address, reason, attempts, when')
    again = commands.add_parser('retry', help=f'make failed {noun}s pending again')
    again.add_argument('ids', nargs='*', type=int, metavar='ID')
    again.add_argument('--all', action='store_true', help=f'every failed {noun}')
    return parser


def main(argv, courier_from_config, *, prog, noun):
    """The operator's command line (`prog --help`), delivering with the courier that
    `courier_from_config(settings)` makes."""
    parser = _parser(prog, noun)
    args = parser.parse_args(argv[1:])
    if args.command == 'retry' and bool(args.ids) == args.all:
        parser.error('retry takes ids or --all')
    if not args.once and not args.command:
        parser.error('name a command, or --once')
    logging.basicConfig(level=logging.INFO)
    settings = config.Config.from_env_or_exit()
    models.connect(settings.database_url)
    if args.once:
        print(f'{courier_from_config(settings).deliver_due()} {noun}(s) handled')
    elif args.command == 'status':
        print_status()
    elif args.command == 'failed':
        print_failed()
    else:
        retry(args.ids, args.all, noun)

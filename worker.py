"""The gunicorn worker `gunicorn personapi:app` runs (gunicorn.conf.py's worker_class):
gunicorn's gthread worker, changed where clients could hold it.

- Request heads are read by the worker's event loop, not by a pool thread: a thread takes
  a connection only once its head is complete (or already wrong), so clients trickling
  their headers hold no thread. A head must be complete HEADER_TIMEOUT seconds after its
  first byte, and a first byte must come within HEADER_TIMEOUT of connecting (within
  the keep-alive time after an answer).
- A full worker closes its longest-idle connection (one that has sent nothing of its next
  request) to take a new one: idle connections do not lock new clients out.
- Closing a connection waits in the event loop for the client's side to close, where
  gunicorn blocks its loop up to 2 s on each client that keeps its side open.
- Body framing: a transfer coding other than chunked is 501 (gunicorn would pass a gzip
  body on as if plain), a chunk size over 2^63-1 is refused (a read would wait for it),
  and what gunicorn refuses is answered with a JSON error body, as the app's errors are.
- Ctrl-C (SIGINT to master and workers alike) and SIGQUIT stop the worker from its event
  loop, not inside the signal handler: shutting the thread pool down in a handler
  deadlocks when the master's SIGQUIT interrupts the terminal's SIGINT (CPython gh-121649).
- A worker whose master is gone (killed with kill -9) stops as on Ctrl-C, its port freed
  first: gunicorn's graceful stop would keep the port for up to graceful_timeout, and a
  master started again could not bind it.

Plain HTTP/1.1 only: TLS ends in front of the service.
"""

import collections
import json
import math
import selectors
import socket
import sys
import time
from functools import partial

from gunicorn import util
from gunicorn.http.body import ChunkedReader
from gunicorn.http.errors import InvalidChunkSize, LimitRequestHeaders, UnsupportedTransferCoding
from gunicorn.workers.gthread import STOP_KEEPALIVE_LINGER, ThreadWorker

from config import Config


def parser_can_answer(head, line_limit, scanned=0):
    """Whether gunicorn's parser can answer `head` without reading more: it is complete or
    already wrong (a bare LF, a request line over the limit). `scanned`: how much of `head`
    was already found wanting; only the rest is searched, so that a head trickling in byte
    by byte costs the event loop its length, not its length squared."""
    if head.find(b'\r\n\r\n', max(0, scanned - 3)) >= 0:
        return True
    line_end = head.find(b'\r\n', 0, line_limit + 3)  # no further: past it is too long
    return (head.count(b'\n', scanned) != head.count(b'\r\n', max(0, scanned - 1))
            or (line_end if line_end >= 0 else len(head) - 2) > line_limit)


MAX_CHUNK_SIZE = 2 ** 63 - 1
# Read once, where gunicorn loads this class (in the master): not again for every worker.
HEADER_TIMEOUT = Config.from_env().header_timeout
LINGER_SECONDS, LINGER_MAX_BYTES = 2.0, 65536  # as gunicorn's util.close_graceful
EVICTIONS_LOG_SECONDS = 60.0  # at most a line a minute on closing idle connections


class SizedChunkedReader(ChunkedReader):
    def parse_chunk_size(self, unreader, data=None):
        size, rest = super().parse_chunk_size(unreader, data)
        if size > MAX_CHUNK_SIZE:
            raise InvalidChunkSize(b'over %d bytes' % MAX_CHUNK_SIZE)
        return size, rest


class CapturedSocket:
    """The client socket, keeping what is written to it instead of sending it."""

    def __init__(self, sock):
        self._sock = sock
        self.written = b''

    def __getattr__(self, name):
        return getattr(self._sock, name)

    def sendall(self, data):
        self.written += data


class Worker(ThreadWorker):
    @classmethod
    def check_config(cls, cfg, log):
        super().check_config(cfg, log)
        if cfg.is_ssl:
            raise RuntimeError('worker.Worker reads plain HTTP/1.1: end TLS in front of it')

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.header_timeout = HEADER_TIMEOUT
        self.waiting = {}  # connection the event loop waits on -> what to do past its deadline
        # Deadlines by how long they are from when set: connections in the order they are due.
        # OrderedDicts: a dict whose first entries are deleted over and over is slow to
        # iterate from its start until it is resized.
        self.timers = collections.defaultdict(collections.OrderedDict)
        # Connections that have sent nothing of their next request, longest idle first
        self.idle = collections.OrderedDict()
        self.next_deadline = math.inf  # no sooner than the first of the timers'
        self.evicted, self.evictions_logged_at = 0, -EVICTIONS_LOG_SECONDS
        self.busy = set()  # connections a pool thread is serving
        self.stopping_at_once = False  # Ctrl-C: no waiting on the mail in hand either
        cfg = self.cfg
        # gunicorn's own bound on a head (its Request.max_buffer_headers), plus the request line
        self.max_head = (cfg.limit_request_line + 2 + 4 +
                         cfg.limit_request_fields * (cfg.limit_request_field_size + 2))

    # --- Stopping --------------------------------------------------------------------------

    def handle_quit(self, sig, frame):
        # Only what is safe in a handler, even entered twice: flags and a wake-up. The loop
        # may end on `alive` before it runs quit(): worker_exit must know the stop is quick.
        self.alive = False
        self.stopping_at_once = True
        self.method_queue.defer(self.quit)

    def quit(self):
        """Stop now, from the event loop, the port freed first. Requests in progress end
        without waiting on their clients: a stalled body reads as ended (400), an answer is
        still written."""
        for listener in self.sockets:
            listener.close()
        for conn in self.busy:
            try:
                conn.sock.shutdown(socket.SHUT_RD)
            except OSError:
                pass  # already closed by its thread
        self.tpool.shutdown(wait=False, cancel_futures=True)
        self.cfg.worker_int(self)
        sys.exit(0)

    def is_parent_alive(self):
        """The master gone (kill -9), stop at once: quit() does not return."""
        if super().is_parent_alive():
            return True
        self.stopping_at_once = True
        self.quit()

    # --- Waiting on clients in the event loop --------------------------------------------

    def wait_for(self, conn, on_readable, on_late, seconds):
        """Have the event loop call on_readable(conn, sock) when the client sends, and
        on_late(conn) if `seconds` pass first."""
        if conn not in self.waiting:
            self.poller.register(conn.sock, selectors.EVENT_READ, partial(on_readable, conn))
        self.waiting[conn] = on_late
        self.set_timer(conn, seconds)

    def set_timer(self, conn, seconds):
        """conn.deadline `seconds` from now. Each timer's connections are kept in the order
        they are due (the same delay, set in turn): only each one's first can be due."""
        if conn.timer is not None:
            del conn.timer[conn]
        conn.deadline = time.monotonic() + seconds
        conn.timer = self.timers[seconds]
        conn.timer[conn] = None
        if conn.deadline < self.next_deadline:
            self.next_deadline = conn.deadline

    def stop_waiting(self, conn):
        self.idle.pop(conn, None)
        if conn.timer is not None:
            del conn.timer[conn]
            conn.timer = None
        if self.waiting.pop(conn, None):
            self.poller.unregister(conn.sock)

    def wait_for_and_dispatch_events(self, timeout):
        if self.nr_conns >= self.worker_connections:
            self.make_room()
        now = time.monotonic()
        super().wait_for_and_dispatch_events(max(0.0, min(timeout, self.next_deadline - now)))
        now = time.monotonic()
        if now >= self.next_deadline:
            self.call_the_late(now)
        if not self.alive:
            # A stopping worker waits for no connection that has sent nothing since it
            # connected (a closing one has sent a head); a kept-alive one a moment more.
            for conn in list(self.idle):
                if not conn.served:
                    self.drop(conn)
                elif conn.deadline > now + STOP_KEEPALIVE_LINGER:
                    self.set_timer(conn, STOP_KEEPALIVE_LINGER)

    def call_the_late(self, now):
        """on_late(conn) for each connection past its deadline; the next deadline."""
        self.next_deadline = math.inf
        for timer in list(self.timers.values()):
            while timer:
                conn = next(iter(timer))
                if conn.deadline > now:
                    self.next_deadline = min(self.next_deadline, conn.deadline)
                    break
                on_late = self.waiting[conn]
                self.stop_waiting(conn)
                on_late(conn)

    def make_room(self):
        """A full worker closes its longest-idle connection, so that the one waiting to be
        accepted (if any) is: gthread would stop accepting until a connection closes."""
        if not self.idle or not self.alive:
            return
        self.drop(next(iter(self.idle)))
        self.set_accept_enabled(True)
        self.evicted += 1
        now = time.monotonic()
        if now - self.evictions_logged_at >= EVICTIONS_LOG_SECONDS:
            self.log.warning('Closed %d idle connection(s) to take new ones: this worker holds '
                             '%d at most (worker_connections)', self.evicted,
                             self.worker_connections)
            self.evicted, self.evictions_logged_at = 0, now

    def accept(self, listener):
        super().accept(listener)
        if self.nr_conns >= self.worker_connections:
            self.make_room()

    def drop(self, conn):
        self.stop_waiting(conn)
        self.nr_conns -= 1
        conn.close()

    # --- Request heads ---------------------------------------------------------------------

    def enqueue_req(self, conn):
        """Read a new connection's first head in the event loop; a thread takes it once it
        is in."""
        conn.served, conn.timer = False, None
        self.await_head(conn, self.header_timeout)

    def await_head(self, conn, idle_timeout):
        """Wait for the connection's next head; until its first byte, the connection is
        idle and may be closed after `idle_timeout`."""
        conn.head, conn.head_scanned = b'', 0  # what of conn.head parser_can_answer found wanting
        self.idle[conn] = None
        self.wait_for(conn, self.read_head, self.head_too_late, idle_timeout)

    def read_head(self, conn, sock):
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            data = None  # nothing new yet
        except OSError:
            data = b''
        first = data and not conn.head
        if first:
            self.idle.pop(conn, None)
            conn.head = data  # no copy: most heads come in one piece
        elif data:
            if not isinstance(conn.head, bytearray):
                conn.head = bytearray(conn.head)  # a trickle grows in place, not by copies
            conn.head += data
        if parser_can_answer(conn.head, self.cfg.limit_request_line, conn.head_scanned):
            self.stop_waiting(conn)
            self.busy.add(conn)
            super().enqueue_req(conn)
        elif data == b'':  # gone before its head was complete
            self.drop(conn)
        elif len(conn.head) > self.max_head:
            self.handle_error(None, sock, conn.client, LimitRequestHeaders('max buffer headers'))
            self.stop_waiting(conn)
            self.close_gracefully(conn)
        else:
            conn.head_scanned = len(conn.head)
            if first or conn not in self.waiting:  # the first byte: the head's clock starts
                self.wait_for(conn, self.read_head, self.head_too_late, self.header_timeout)

    def head_too_late(self, conn):
        if conn.head:
            self.log.info('Closed a connection whose request head took over %ss (ip=%s)',
                          self.header_timeout, conn.client[0])
        self.drop(conn)

    def handle(self, conn):
        """Runs on a pool thread: serve the request whose head the event loop read."""
        conn.data_ready = True  # gunicorn need not wait for a first byte: the head is here
        if not conn.initialized:
            conn.init()
        conn.parser.unreader.unread(conn.head)
        return super().handle(conn)

    def finish_request(self, conn, fs):
        self.busy.discard(conn)
        conn.served = True
        try:
            keep_alive = not fs.cancelled() and fs.result()
        except Exception:
            keep_alive = None
        if keep_alive is True:
            conn.sock.setblocking(False)
            if conn.parser.unreader.buf.getvalue():  # a body's read took some of the next head
                conn.head, conn.head_scanned = conn.parser.unreader.take_buffered(), 0
                self.read_head(conn, conn.sock)
            else:
                self.await_head(conn, self.cfg.keepalive)
        elif keep_alive is False:
            self.close_gracefully(conn)
        else:
            super().finish_request(conn, fs)  # closed at once after a failure

    # --- Closing ---------------------------------------------------------------------------

    def close_gracefully(self, conn):
        """Close as gunicorn does (RFC 9112 section 9.6: send FIN, then read what the client
        still sends, lest unread bytes make the kernel reset the connection and cut the
        answer short), but in the event loop: gunicorn waits there, blocking everything,
        up to 2 s for each client that does not close its side."""
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.drop(conn)
            return
        conn.drained = 0
        conn.sock.setblocking(False)
        self.wait_for(conn, self.drain, self.drop, LINGER_SECONDS)

    def drain(self, conn, sock):
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b''
        conn.drained += len(data)
        if not data or conn.drained > LINGER_MAX_BYTES:
            self.drop(conn)

    # --- Framing ---------------------------------------------------------------------------

    def handle_request(self, req, conn):
        # gunicorn refuses a Transfer-Encoding that does not end with chunked itself
        if isinstance(req.body.reader, ChunkedReader):
            codings = [coding.strip().lower() for name, value in req.headers
                       if name == 'TRANSFER-ENCODING' for coding in value.split(',')]
            if codings != ['chunked']:
                raise UnsupportedTransferCoding(', '.join(codings))
            req.body.reader = SizedChunkedReader(req, req.unreader)
        return super().handle_request(req, conn)

    def handle_error(self, req, client, addr, exc):
        """gunicorn's answer (status, log lines), with a JSON body in place of its HTML page."""
        page = CapturedSocket(client)
        super().handle_error(req, page, addr, exc)
        status = page.written.split(b'\r\n', 1)[0].partition(b' ')[2].decode('latin-1')
        # gunicorn blames the client (and says why) for everything but its own failure, a 500
        description = 'Something went wrong.' if status.startswith('500') else str(exc)
        body = json.dumps({'title': status, 'description': description}).encode()
        head = (f'HTTP/1.1 {status}\r\nConnection: close\r\nContent-Type: application/json\r\n'
                f'Content-Length: {len(body)}\r\nX-Content-Type-Options: nosniff\r\n'
                'Cache-Control: no-store\r\n\r\n')
        try:
            util.write_nonblock(client, head.encode('latin-1') + body)
        except OSError:
            self.log.debug('Failed to send an error answer.')

"""The gunicorn worker `gunicorn personapi:app` runs (gunicorn.conf.py's worker_class):
gunicorn's gthread worker, changed where clients could hold it.

- Request heads are read by the worker's event loop, not by a pool thread: a thread takes
  a connection only once its head is complete (or already wrong), so clients trickling
  their headers hold no thread. A head must be complete HEADER_TIMEOUT seconds after its
  first byte, and a first byte must come within HEADER_TIMEOUT of connecting.
- Closing a connection waits in the event loop for the client's side to close, where
  gunicorn blocks its loop up to 2 s on each client that keeps its side open.
- Body framing: a transfer coding other than chunked is 501 (gunicorn would pass a gzip
  body on as if plain), a chunk size over 2^63-1 is refused (a read would wait for it),
  and what gunicorn refuses is answered with a JSON error body, as the app's errors are.
- Ctrl-C (SIGINT to master and workers alike) and SIGQUIT stop the worker from its event
  loop, not inside the signal handler: shutting the thread pool down in a handler
  deadlocks when the master's SIGQUIT interrupts the terminal's SIGINT (CPython gh-121649).

Plain HTTP/1.1 only: TLS ends in front of the service.
"""

import json
import selectors
import socket
import sys
import time
from functools import partial

from gunicorn import util
from gunicorn.http.body import ChunkedReader
from gunicorn.http.errors import InvalidChunkSize, LimitRequestHeaders, UnsupportedTransferCoding
from gunicorn.workers.gthread import ThreadWorker

from config import Config


def parser_can_answer(head, line_limit, scanned=0):
    """Whether gunicorn's parser can answer `head` without reading more: it is complete or
    already wrong (a bare LF, a request line over the limit). `scanned`: how much of `head`
    was already found wanting; only the rest is searched, so that a head trickling in byte
    by byte costs the event loop its length, not its length squared."""
    line_end = head.find(b'\r\n', 0, line_limit + 3)  # no further: past it is too long
    return (head.find(b'\r\n\r\n', max(0, scanned - 3)) >= 0
            or head.count(b'\n', scanned) != head.count(b'\r\n', max(0, scanned - 1))
            or (line_end if line_end >= 0 else len(head) - 2) > line_limit)


MAX_CHUNK_SIZE = 2 ** 63 - 1
# Read once, where gunicorn loads this class (in the master): not again for every worker.
HEADER_TIMEOUT = Config.from_env().header_timeout
LINGER_SECONDS, LINGER_MAX_BYTES = 2.0, 65536  # as gunicorn's util.close_graceful


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
        """Stop now, from the event loop. Requests in progress end without waiting on their
        clients: a stalled body reads as ended (400), an answer is still written."""
        for conn in self.busy:
            try:
                conn.sock.shutdown(socket.SHUT_RD)
            except OSError:
                pass  # already closed by its thread
        self.tpool.shutdown(wait=False, cancel_futures=True)
        self.cfg.worker_int(self)
        sys.exit(0)

    # --- Waiting on clients in the event loop --------------------------------------------

    def wait_for(self, conn, on_readable, on_late):
        """Have the event loop call on_readable(conn, sock) when the client sends, and
        on_late(conn) once conn.deadline passes."""
        if conn not in self.waiting:
            self.poller.register(conn.sock, selectors.EVENT_READ, partial(on_readable, conn))
        self.waiting[conn] = on_late

    def stop_waiting(self, conn):
        if self.waiting.pop(conn, None):
            self.poller.unregister(conn.sock)

    def wait_for_and_dispatch_events(self, timeout):
        if self.waiting:
            first_deadline = min(conn.deadline for conn in self.waiting)
            timeout = max(0.0, min(timeout, first_deadline - time.monotonic()))
        super().wait_for_and_dispatch_events(timeout)
        now = time.monotonic()
        for conn, on_late in list(self.waiting.items()):
            # A stopping worker waits for no connection that has sent nothing yet (a closing
            # one has sent a head).
            if now >= conn.deadline or (not self.alive and not conn.head):
                on_late(conn)

    def drop(self, conn):
        self.stop_waiting(conn)
        self.nr_conns -= 1
        conn.close()

    # --- Request heads ---------------------------------------------------------------------

    def enqueue_req(self, conn):
        """Read the connection's next head in the event loop; a thread takes it once it is in."""
        conn.head = bytearray(conn.parser.unreader.take_buffered() if conn.parser else b'')
        conn.head_scanned = 0  # what of conn.head parser_can_answer found wanting
        conn.deadline = time.monotonic() + self.header_timeout
        conn.sock.setblocking(False)
        self.read_head(conn, conn.sock)  # a kept-alive connection has its head here already

    def read_head(self, conn, sock):
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            data = None  # nothing new yet
        except OSError:
            data = b''
        if data and not conn.head:  # the first byte: the head's clock starts now
            conn.deadline = time.monotonic() + self.header_timeout
        conn.head += data or b''
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
            self.wait_for(conn, self.read_head, self.head_too_late)

    def head_too_late(self, conn):
        if conn.head:
            self.log.info('Closed a connection whose request head took over %ss (ip=%s)',
                          self.header_timeout, conn.client[0])
        self.drop(conn)

    def handle(self, conn):
        """Runs on a pool thread: serve the request whose head the event loop read."""
        conn.data_ready = True  # gunicorn need not wait for a first byte: the head is here
        conn.init()
        conn.parser.unreader.unread(bytes(conn.head))
        return super().handle(conn)

    def finish_request(self, conn, fs):
        self.busy.discard(conn)
        if fs.cancelled() or fs.exception() is not None or fs.result():
            super().finish_request(conn, fs)  # kept alive, or closed at once after a failure
        else:
            self.close_gracefully(conn)

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
        conn.deadline = time.monotonic() + LINGER_SECONDS
        conn.drained = 0
        conn.sock.setblocking(False)
        self.wait_for(conn, self.drain, self.drop)

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
        codings = [coding.strip().lower() for name, value in req.headers
                   if name == 'TRANSFER-ENCODING' for coding in value.split(',')]
        if codings and codings != ['chunked']:
            raise UnsupportedTransferCoding(', '.join(codings))
        if isinstance(req.body.reader, ChunkedReader):
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

"""The gunicorn worker at the edge (worker.py), end to end: stopping on signals, clients
that trickle their request heads, malformed body framing."""

import os
import selectors
import signal
import socket
import subprocess
import threading
import time

import pytest

from support import Service


# The HTTP server behaves the same on every database: one engine is enough.
pytestmark = pytest.mark.parametrize('engine', ['sqlite'], indirect=True)

PERSON = {'first_name': 'Ada', 'last_name': 'Lovelace', 'email': 'ada@example.com'}


def test_ctrl_c_stops_the_service_promptly_every_time(service_env, tmp_path):
    """SIGINT to the whole process group, as a terminal's Ctrl-C sends it."""
    log_path = tmp_path / 'gunicorn.log'
    for attempt in range(20):
        service = Service(service_env, log_path=log_path).start()
        started = time.monotonic()
        os.killpg(service.process.pid, signal.SIGINT)
        try:
            service.process.wait(5)
        except subprocess.TimeoutExpired:
            service.kill()
            pytest.fail(f'attempt {attempt + 1}: still running 5 s after Ctrl-C')
        print(attempt, round(time.monotonic() - started, 2))
    assert 'SIGKILL' not in log_path.read_text()


def test_sigterm_stops_gracefully_and_the_courier_finishes_its_mail(service_env, smtp, tmp_path):
    smtp.delay = 1.5  # the mail is in hand, mid-delivery, when SIGTERM comes
    service = Service(service_env, log_path=tmp_path / 'gunicorn.log').start()
    try:
        assert service.request('POST', '/person', PERSON)[0] == 201
        time.sleep(0.5)
        service.process.send_signal(signal.SIGTERM)
        assert service.process.wait(15) == 0
    finally:
        service.kill()
    assert [rcpts for rcpts, _ in smtp.received()] == [[PERSON['email']]]


# --- Clients that trickle their request heads ------------------------------------------

class Tricklers:
    """Connections that send a request head one header line at a time, never finishing it."""

    def __init__(self, port, count, interval=0.3):
        self.first_byte = {}
        self.closed = {}
        self._interval = interval
        self._selector = selectors.DefaultSelector()
        for _ in range(count):
            sock = socket.create_connection(('127.0.0.1', port))
            sock.sendall(b'POST /person HTTP/1.1\r\nHost: x\r\n')
            self.first_byte[sock] = time.monotonic()
            self._selector.register(sock, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._trickle, daemon=True)
        self._thread.start()

    def _trickle(self):
        while len(self.closed) < len(self.first_byte):
            for key, _ in self._selector.select(self._interval):  # readable: the server closed it
                self._close(key.fileobj)
            for sock in set(self.first_byte) - set(self.closed):
                try:
                    sock.sendall(b'X-Trickle: 1\r\n')
                except OSError:
                    self._close(sock)

    def _close(self, sock):
        if sock not in self.closed:
            self.closed[sock] = time.monotonic()
            self._selector.unregister(sock)
            sock.close()

    def lifetimes(self, timeout):
        """Seconds from each connection's first byte until the server closed it."""
        self._thread.join(timeout)
        return [self.closed[sock] - self.first_byte[sock] for sock in self.first_byte
                if sock in self.closed]


def timed(call):
    started = time.monotonic()
    result = call()
    return result, time.monotonic() - started


def test_clients_trickling_headers_hold_no_thread_and_are_cut_off(service_env, tmp_path):
    header_timeout = 3.0
    service = Service({**service_env, 'HEADER_TIMEOUT': str(header_timeout)},
                      log_path=tmp_path / 'gunicorn.log').start()  # 2 workers x 8 threads
    try:
        tricklers = Tricklers(service.port, 24)
        time.sleep(1.0)  # every trickler is in, sending its headers
        (health, _, _), health_seconds = timed(lambda: service.request('GET', '/healthz', timeout=5))
        (created, _, _), post_seconds = timed(
            lambda: service.request('POST', '/person', PERSON, timeout=5))
        lifetimes = tricklers.lifetimes(timeout=header_timeout + 10)
    finally:
        service.kill()
    print(f'healthz {health_seconds:.3f} s, POST {post_seconds:.3f} s, tricklers closed after '
          f'{min(lifetimes):.2f} to {max(lifetimes):.2f} s')
    assert (health, created) == (200, 201)
    assert health_seconds < 1.0 and post_seconds < 1.0
    assert len(lifetimes) == 24
    assert all(header_timeout - 0.5 <= seconds <= header_timeout + 3 for seconds in lifetimes)

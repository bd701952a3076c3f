"""Real collaborators for the tests: an SMTP sink and a gunicorn service on loopback."""

import asyncio
import collections
import contextlib
import email
import email.policy
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller

ROOT = Path(__file__).resolve().parent.parent
# For a test whose subject does not depend on the database: SQLite alone, not every engine.
one_engine = pytest.mark.parametrize('engine', ['sqlite'], indirect=True)


def free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout=10.0, interval=0.05):
    """Poll `predicate` until it is true; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


Mail = collections.namedtuple('Mail', 'rcpt_tos message mail_from raw')


class SmtpSink:
    """An aiosmtpd server that keeps every message it accepts: envelope, raw bytes, parsed.

    Like `make mailsink` and most relays it offers no SMTPUTF8 unless `smtputf8=True`.
    Knobs, which may change while it runs: `reply` answers DATA (e.g. '550 rejected'),
    `mail_reply` answers MAIL FROM (e.g. '530 authentication required'), `refuse` maps a
    recipient to its RCPT answer, `delay` holds every reply to EHLO, MAIL, RCPT and DATA.
    """

    def __init__(self, port=None, smtputf8=False, **controller_options):
        self.messages = []
        self.reply = self.mail_reply = None
        self.refuse = {}
        self.delay = 0.0
        self._lock = threading.Lock()
        self.port = port or free_port()
        self._controller = Controller(self, hostname='127.0.0.1', port=self.port,
                                      enable_SMTPUTF8=smtputf8, **controller_options)

    async def _wait(self):
        if self.delay:
            await asyncio.sleep(self.delay)  # time.sleep would stall every other session

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        await self._wait()
        session.host_name = hostname
        return responses

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        await self._wait()
        if self.mail_reply:
            return self.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return '250 OK'

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        await self._wait()
        if address in self.refuse:
            return self.refuse[address]
        envelope.rcpt_tos.append(address)
        return '250 OK'

    async def handle_DATA(self, server, session, envelope):
        await self._wait()
        if self.reply:
            return self.reply
        raw = envelope.original_content
        message = email.message_from_bytes(raw, policy=email.policy.default)
        with self._lock:
            self.messages.append(Mail(list(envelope.rcpt_tos), message, envelope.mail_from, raw))
        return '250 OK'

    def start(self):
        self._controller.start()
        return self

    def stop(self):
        self._controller.stop()

    def received(self):
        with self._lock:
            return list(self.messages)

    def recipients(self):
        return sorted(rcpt for mail in self.received() for rcpt in mail.rcpt_tos)

    def wait_for(self, count, timeout=10.0):
        return len(wait_until(lambda: len(self.received()) >= count and self.received(),
                              timeout) or [])


class RefusingRelay:
    """An SMTP server that greets every connection with `greeting` (e.g. '554 no service')
    and hangs up: what a relay out of service or refusing this client says."""

    def __init__(self, greeting):
        self.greeting = greeting
        self._server = socket.create_server(('127.0.0.1', 0))
        self.port = self._server.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            with client:
                client.sendall(f'{self.greeting}\r\n'.encode())

    def stop(self):
        self._server.close()


def http(method, url, body=None, headers=None, timeout=10.0):
    """One request; returns (status, headers, parsed JSON body or None)."""
    data = json.dumps(body).encode() if body is not None else None
    headers = {'Content-Type': 'application/json', **(headers or {})}
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, reply_headers, raw = response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        status, reply_headers, raw = error.code, error.headers, error.read()
    return status, reply_headers, json.loads(raw) if raw else None


class Service:
    """`gunicorn personapi:app` with the project's gunicorn.conf.py, in its own process group."""

    def __init__(self, env, workers=2, log_path=None, port=None):
        self.port = port or free_port()
        self.url = f'http://127.0.0.1:{self.port}'
        self.env = {**os.environ, 'WEB_CONCURRENCY': str(workers), **env}
        self.log_path = log_path
        self.process = None

    def start(self, timeout=20.0):
        log = open(self.log_path, 'ab') if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(
            [sys.executable, '-m', 'gunicorn', '--bind', f'127.0.0.1:{self.port}'],
            cwd=ROOT, env=self.env, stdout=log, stderr=log, start_new_session=True)
        if not wait_until(self._healthy, timeout):
            self.kill()
            raise RuntimeError(f'gunicorn did not become healthy on port {self.port}')
        return self

    def _healthy(self):
        if self.process.poll() is not None:
            raise RuntimeError(f'gunicorn exited with {self.process.returncode}')
        try:
            return http('GET', f'{self.url}/readyz', timeout=1)[0] == 200
        except OSError:
            return False

    def stop(self, timeout=30.0):
        """Graceful: SIGTERM to the master, as an orchestrator does."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout)

    def kill(self):
        """kill -9 of the whole process group: master and every worker at once."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def request(self, method, path, body=None, **options):
        return http(method, self.url + path, body, **options)


class TcpProxy:
    """A TCP proxy on loopback to `target` (host, port), which a test can cut (every
    connection closed, new ones refused) and restore: a server that goes away and comes
    back, without touching the server."""

    def __init__(self, target):
        self.target = target
        self.port = free_port()
        self._connections = []
        self._lock = threading.Lock()
        self._listener = None
        self.restore()

    def restore(self):
        self._listener = socket.create_server(('127.0.0.1', self.port))
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def cut(self):
        with contextlib.suppress(OSError):  # close() alone leaves accept() listening
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            connections, self._connections = self._connections, []
        for connection in connections:
            connection.close()

    def _accept(self, listener):
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                server = socket.create_connection(self.target, timeout=5)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._connections += [client, server]
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source, sink):
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)


def error_lines(log_path, text):
    """{pid: how many ERROR lines hold `text`} in a gunicorn log of the text format."""
    counts = {}
    for line in log_path.read_text().splitlines():
        found = re.match(r'\[[^]]+\] \[(\d+)\] \[ERROR\] ', line)
        if found and text in line:
            counts[int(found.group(1))] = counts.get(int(found.group(1)), 0) + 1
    return counts

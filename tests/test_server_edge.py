"""The gunicorn worker at the edge (worker.py), end to end: stopping on signals, clients
that trickle their request heads, malformed body framing."""

import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from support import ROOT, Service, one_engine, wait_until


# The HTTP server behaves the same on every database: one engine is enough.
pytestmark = one_engine

PERSON = {'first_name': 'Ada', 'last_name': 'Lovelace', 'email': 'ada@example.com'}


STALLED_BODY = (b'POST /person HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n'
                b'Content-Length: 100\r\n\r\n{"first_name"')


def test_ctrl_c_stops_the_service_promptly_every_time(service_env, tmp_path):
    """SIGINT to the whole process group, as a terminal's Ctrl-C sends it; every other time
    with a request in progress whose body stalls (BODY_TIMEOUT is 10 s)."""
    log_path = tmp_path / 'gunicorn.log'
    for attempt in range(20):
        service = Service(service_env, log_path=log_path).start()
        with socket.create_connection(('127.0.0.1', service.port)) as stalled:
            if attempt % 2:
                stalled.sendall(STALLED_BODY)
                time.sleep(0.2)
            os.killpg(service.process.pid, signal.SIGINT)
            try:
                assert service.process.wait(5) == 0
            except subprocess.TimeoutExpired:
                service.kill()
                pytest.fail(f'attempt {attempt + 1}: still running 5 s after Ctrl-C')
    assert 'SIGKILL' not in log_path.read_text()


def test_ctrl_c_does_not_wait_for_a_stalled_relay(service_env, smtp, tmp_path):
    smtp.delay = 30  # every SMTP reply: the mail in hand would hold the courier for long
    service = Service({**service_env, 'SMTP_TIMEOUT': '20'},
                      log_path=tmp_path / 'gunicorn.log').start()
    try:
        assert service.request('POST', '/person', PERSON)[0] == 201
        time.sleep(1)  # the courier is waiting on the relay
        os.killpg(service.process.pid, signal.SIGINT)
        assert service.process.wait(5) == 0
    finally:
        service.kill()


def test_sigterm_stops_gracefully_and_the_courier_finishes_its_mail(service_env, smtp, tmp_path):
    smtp.delay = 0.6  # each SMTP reply: the session opens by 0.7 s and the mail ends at 2.5 s
    service = Service(service_env, log_path=tmp_path / 'gunicorn.log').start()
    try:
        assert service.request('POST', '/person', PERSON)[0] == 201
        time.sleep(1.5)  # the mail is in hand, mid-delivery
        service.process.send_signal(signal.SIGTERM)
        assert service.process.wait(15) == 0
    finally:
        service.kill()
    assert [mail.rcpt_tos for mail in smtp.received()] == [[PERSON['email']]]


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


def closed_by_server(sock):
    """Whether the server closed `sock` (it reads as ended); False while it stays open."""
    ready = selectors.DefaultSelector()
    ready.register(sock, selectors.EVENT_READ)
    try:
        return bool(ready.select(timeout=0)) and sock.recv(1) == b''
    finally:
        ready.close()


def test_a_full_worker_closes_its_longest_idle_connection_for_a_new_client(service_env,
                                                                           tmp_path):
    """Connections that send nothing fill a worker's worker_connections; gthread would
    then accept no one until one of them times out (HEADER_TIMEOUT, a minute here)."""
    limit, idle = 20, 30
    service = Service({**service_env, 'HEADER_TIMEOUT': '60',
                       'GUNICORN_CMD_ARGS': f'--worker-connections {limit}'}, workers=1,
                      log_path=tmp_path / 'gunicorn.log').start()
    holders = []
    try:
        for _ in range(idle):
            holders.append(socket.create_connection(('127.0.0.1', service.port), timeout=10))
        # Accepting the last of them has closed the longest idle: at most limit - 1 stay.
        assert wait_until(lambda: sum(map(closed_by_server, holders)) >= idle - limit + 1)
        status, _, _ = service.request('GET', '/healthz', timeout=20)
        closed = [closed_by_server(sock) for sock in holders]
    finally:
        for sock in holders:
            sock.close()
        service.stop()
    assert status == 200
    assert holders and closed[0] and not closed[-1]  # the longest idle first, the newest kept
    assert 'Closed ' in (tmp_path / 'gunicorn.log').read_text()


def test_a_worker_holds_as_many_connections_as_the_process_may_open_files(engine):
    """The soft limit on open files is raised to the hard one, and worker_connections
    follows it, less a margin for the worker's own files."""
    settings = ('import resource, runpy; '
                'resource.setrlimit(resource.RLIMIT_NOFILE, (256, 1000)); '
                'connections = runpy.run_path("gunicorn.conf.py")["worker_connections"]; '
                'print(connections, *resource.getrlimit(resource.RLIMIT_NOFILE))')
    connections, soft, hard = map(int, subprocess.run(
        [sys.executable, '-c', settings], cwd=ROOT, capture_output=True, text=True,
        check=True).stdout.split())
    assert soft == hard == 1000
    assert 1000 - 200 <= connections < 1000


# --- Malformed body framing ------------------------------------------------------------

def exchange(service, payload):
    """Send raw bytes and read until the server closes; returns (status, headers, JSON body)."""
    with socket.create_connection(('127.0.0.1', service.port), timeout=10) as sock:
        sock.sendall(payload)
        reply = b''
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b'\r\n\r\n')
    status_line, *header_lines = head.decode('latin-1').split('\r\n')
    headers = dict(line.lower().split(': ', 1) for line in header_lines)
    return int(status_line.split(' ')[1]), headers, json.loads(body)


def post_chunked(chunks, transfer_encoding=b'chunked', version=b'1.1', extra=b''):
    return (b'POST /person HTTP/' + version + b'\r\nHost: x\r\nContent-Type: application/json\r\n'
            b'Transfer-Encoding: ' + transfer_encoding + b'\r\n' + extra + b'\r\n' + chunks)


BODY = json.dumps(PERSON).encode()
CHUNKED_BODY = b'%x\r\n%s\r\n0\r\n\r\n' % (len(BODY), BODY)
MALFORMED = [
    ('chunk size zz', post_chunked(b'zz\r\n' + BODY + b'\r\n0\r\n\r\n'), 400),
    ('chunk size -5', post_chunked(b'-5\r\n' + BODY + b'\r\n0\r\n\r\n'), 400),
    ('chunk size 0x10', post_chunked(b'0x10\r\n' + BODY + b'\r\n0\r\n\r\n'), 400),
    ('empty chunk size', post_chunked(b'\r\n' + BODY + b'\r\n0\r\n\r\n'), 400),
    ('chunk size over 2^64', post_chunked(b'1' + b'0' * 16 + b'\r\n' + BODY + b'\r\n0\r\n\r\n'), 400),
    ('chunk size over 2^63-1', post_chunked(b'8' + b'0' * 15 + b'\r\n' + BODY + b'\r\n0\r\n\r\n'), 400),
    ('chunk longer than its size', post_chunked(b'%x\r\n%sXX\r\n0\r\n\r\n' % (len(BODY), BODY)), 400),
    ('chunk without its CRLF', post_chunked(b'%x\r\n%s0\r\n\r\n' % (len(BODY), BODY)), 400),
    ('bare LF after the chunk size', post_chunked(b'%x\n%s\r\n0\r\n\r\n' % (len(BODY), BODY)), 400),
    ('control byte in a chunk extension', post_chunked(b'%x;a\x01\r\n%s\r\n0\r\n\r\n' % (len(BODY), BODY)), 400),
    ('gzip, chunked', post_chunked(CHUNKED_BODY, b'gzip, chunked'), 501),
    ('deflate, chunked', post_chunked(CHUNKED_BODY, b'deflate, chunked'), 501),
    ('identity, chunked', post_chunked(CHUNKED_BODY, b'identity, chunked'), 501),
    ('an unknown coding, chunked', post_chunked(CHUNKED_BODY, b'br, chunked'), 501),
    ('chunked in two headers with gzip', post_chunked(CHUNKED_BODY, b'gzip\r\nTransfer-Encoding: chunked'), 501),
    ('identity alone', post_chunked(BODY, b'identity', extra=b'Content-Length: %d\r\n' % len(BODY)), 400),
    ('gzip alone', post_chunked(BODY, b'gzip'), 400),
    ('chunked, chunked', post_chunked(CHUNKED_BODY, b'chunked, chunked'), 400),
    ('chunked then gzip', post_chunked(CHUNKED_BODY, b'chunked, gzip'), 400),
    ('chunked with Content-Length', post_chunked(CHUNKED_BODY, extra=b'Content-Length: 5\r\n'), 400),
    ('chunked in HTTP/1.0', post_chunked(CHUNKED_BODY, version=b'1.0'), 400),
]


@pytest.mark.parametrize('payload, expected', [(p, e) for _, p, e in MALFORMED],
                         ids=[name for name, _, _ in MALFORMED])
def test_malformed_framing_is_a_json_client_error(service, tmp_path, payload, expected):
    status, headers, body = exchange(service, payload)
    assert (status, headers['content-type']) == (expected, 'application/json')
    assert body['title'] and body['description']
    assert service.request('GET', '/person/1')[0] == 404  # nothing was stored
    log = (tmp_path / 'gunicorn.log').read_text()
    assert 'Traceback' not in log and '[ERROR]' not in log


def test_a_well_framed_chunked_body_is_served(service):
    status, _, body = exchange(service, post_chunked(
        b'5\r\n' + BODY[:5] + b'\r\n%x\r\n' % (len(BODY) - 5) + BODY[5:] + b'\r\n0\r\n\r\n',
        extra=b'Connection: close\r\n'))
    assert (status, body['email']) == (201, PERSON['email'])


def test_pipelined_requests_are_each_answered(service):
    request = b'GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n'
    with socket.create_connection(('127.0.0.1', service.port), timeout=10) as sock:
        sock.sendall(request * 2 + request.replace(b'Host', b'Connection: close\r\nHost'))
        reply = b''
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.count(b'HTTP/1.1 200 OK\r\n') == 3


def test_a_head_over_the_limits_is_refused_before_it_ends(service):
    endless = b'GET /healthz HTTP/1.1\r\nHost: x\r\nX-Long: ' + b'a' * 600_000
    started = time.monotonic()
    status, headers, body = exchange(service, endless)
    assert (status, headers['content-type']) == (431, 'application/json')
    assert time.monotonic() - started < 5  # HEADER_TIMEOUT is 10 s


def test_clients_that_never_close_their_side_hold_nothing(service):
    """After a `Connection: close` answer the server waits for the client to close too;
    clients that never do must not hold the others up."""
    holders = [socket.create_connection(('127.0.0.1', service.port)) for _ in range(24)]
    try:
        for sock in holders:
            sock.sendall(b'GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n')
        time.sleep(0.5)
        (status, _, _), seconds = timed(lambda: service.request('GET', '/healthz', timeout=30))
    finally:
        for sock in holders:
            sock.close()
    print(f'healthz {seconds:.3f} s')
    assert status == 200 and seconds < 1.0


# --- Listening --------------------------------------------------------------------------------

def listening_sockets(port):
    """The sockets listening on the IPv4 `port`, by inode (from /proc/net/tcp)."""
    with open('/proc/net/tcp') as table:
        rows = [line.split() for line in table.readlines()[1:]]
    return {row[9] for row in rows if row[3] == '0A' and int(row[1].split(':')[1], 16) == port}


def test_each_worker_listens_on_a_socket_of_its_own(service):
    """So that the kernel shares connections out between them: on one shared socket a
    burst of keep-alive clients could all go to one worker."""
    assert wait_until(lambda: len(listening_sockets(service.port)) == 2)


def test_the_start_says_once_where_it_listens(service, tmp_path):
    """gunicorn's master would add a line naming no address: with SO_REUSEPORT it has no
    socket of its own."""
    lines = [line for line in (tmp_path / 'gunicorn.log').read_text().splitlines()
             if 'Listening at:' in line]
    assert [line.split('] ')[-1] for line in lines] == [
        f'Listening at: {service.url} (a socket per worker, SO_REUSEPORT)']


def gunicorn(service_env, *flags):
    return subprocess.Popen([sys.executable, '-m', 'gunicorn', *flags], cwd=ROOT,
                            env={**os.environ, **service_env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def test_a_port_in_use_stops_the_start_with_one_line(service_env):
    with socket.create_server(('127.0.0.1', 0)) as taken:
        port = taken.getsockname()[1]
        process = gunicorn(service_env, '--bind', f'127.0.0.1:{port}')
        _, errors = process.communicate(timeout=30)
    assert process.returncode == 1
    assert f'personapi: 127.0.0.1:{port} is in use; stop what listens there' in errors


def test_a_unix_socket_is_served(service_env, tmp_path):
    path = tmp_path / 'personapi.sock'
    process = gunicorn(service_env, '--bind', f'unix:{path}')
    try:
        assert wait_until(path.exists)
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(10)
            assert wait_until(lambda: client.connect_ex(str(path)) == 0)
            client.sendall(b'GET /healthz HTTP/1.0\r\n\r\n')
            assert client.recv(100).split(b' ')[1] == b'200'
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()

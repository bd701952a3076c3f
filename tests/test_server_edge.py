"""The gunicorn worker at the edge (worker.py), end to end: stopping on signals, clients
that trickle their request heads, malformed body framing."""

import os
import signal
import subprocess
import time

import pytest

from support import Service


# The HTTP server behaves the same on every database: one engine is enough.
pytestmark = pytest.mark.parametrize('engine', ['sqlite'], indirect=True)


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

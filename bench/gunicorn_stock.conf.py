"""gunicorn as it ships, for the stock ceilings of bench/ceiling.py: the user's real limit.

Stock `gthread`, no access log, no logger class, no hooks of the service's: of the
service's gunicorn.conf.py only how many processes and threads serve and how long a
connection is kept alive. And its SO_REUSEPORT, a listening option of gunicorn's own: it
spreads the connections evenly over the workers, where one shared socket may hand all of
a burst to one worker (a quarter of the speed, in some runs): it only ever makes the
ceiling faster. And no control socket, as the service.

The bare ceiling is the default application; `gunicorn -c bench/gunicorn_stock.conf.py
bench.ceiling:mail_app` serves the mail ceiling, whose sender the one hook below starts.
"""

import runpy
from pathlib import Path

_service = runpy.run_path(str(Path(__file__).resolve().parent.parent / 'gunicorn.conf.py'))
workers, threads, keepalive = _service['workers'], _service['threads'], _service['keepalive']
reuse_port = True
# Not on a request's path; two instances at once would fight over its one default path.
control_socket_disable = True
worker_class = 'gthread'
wsgi_app = 'bench.ceiling:app'


def post_worker_init(worker):
    """A mail ceiling's sender thread (a bare ceiling has none)."""
    from bench import ceiling

    ceiling.start_sender(worker.app.app_uri)

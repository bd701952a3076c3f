"""The service's gunicorn settings (gunicorn.conf.py) for the same-config ceilings of
bench/ceiling.py: what the app alone costs, the server's settings being the same.

Every setting is taken from the service's file as it is (worker class, workers, threads,
keep-alive, access log...), so a change there carries over; only the application and the
server hooks differ: the service's create its schema and start its courier, the ceilings
have no ORM, and the mail ceiling starts its own sender. The bare ceiling is the default
application; `gunicorn -c bench/gunicorn_ceiling.conf.py bench.ceiling:mail_app` serves
the mail ceiling. bench/gunicorn_stock.conf.py serves them on gunicorn as it ships.
"""

import runpy
from pathlib import Path

from gunicorn.config import KNOWN_SETTINGS

_HOOKS = {setting.name for setting in KNOWN_SETTINGS if setting.section == 'Server Hooks'}
_service = runpy.run_path(str(Path(__file__).resolve().parent.parent / 'gunicorn.conf.py'))
globals().update({name: value for name, value in _service.items()
                  if name not in _HOOKS and not name.startswith('_')})
wsgi_app = 'bench.ceiling:app'


def post_worker_init(worker):
    """The mail ceiling's sender thread, started where the service starts its courier."""
    from bench import ceiling

    ceiling.start_sender(worker.app.app_uri)

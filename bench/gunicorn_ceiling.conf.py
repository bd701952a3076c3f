"""The service's gunicorn settings (gunicorn.conf.py) for bench/ceiling.py.

Every setting is taken as it is; only the service's hooks are left out (schema creation,
the mail courier), since the ceiling has no ORM and no mail.
"""

import runpy
import types

_service = runpy.run_path('gunicorn.conf.py')
globals().update({name: value for name, value in _service.items()
                  if not isinstance(value, types.FunctionType) and not name.startswith('_')})
wsgi_app = 'bench.ceiling:app'

"""Every setting of the service, read from the environment in this one place."""

import dataclasses
import os


def _flag(value):
    value = value.strip().lower()
    if value in ('1', 'true', 'yes', 'on'):
        return True
    if value in ('0', 'false', 'no', 'off'):
        return False
    raise ValueError(value)


_PARSERS = {str: str, int: int, float: float, bool: _flag}


@dataclasses.dataclass(frozen=True)
class Config:
    """The service's settings; each default is the one the README documents."""

    database_url: str = 'sqlite:///data/persons.db'
    smtp_host: str = 'localhost'
    smtp_port: int = 1025
    smtp_username: str = ''
    smtp_password: str = ''
    smtp_starttls: bool = False
    smtp_timeout: float = 10.0
    mail_from: str = 'Person API <no-reply@personapi.local>'
    mail_max_backoff: float = 60.0
    mail_concurrency: int = 4  # SMTP sessions each worker sends on at once
    rate_limit: str = '60/minute'
    rate_limit_storage: str = 'memory://'
    api_token: str = ''
    body_timeout: float = 10.0  # seconds a client may stall while sending a body
    forwarded_allow_ips: str = ''  # proxies whose X-Forwarded-For is believed; none by default
    web_concurrency: int = 0  # gunicorn workers; 0: one per CPU core
    metrics: bool = True  # serve GET /metrics (Prometheus)
    log_format: str = 'text'  # text or json (one object per line)

    @classmethod
    def from_env(cls, environ=None):
        """Build the settings from `environ` (default: the process environment)."""
        environ = os.environ if environ is None else environ
        values = {}
        for field in dataclasses.fields(cls):
            name = field.name.upper()
            raw = environ.get(name, '')
            if raw == '':
                continue
            try:
                values[field.name] = _PARSERS[field.type](raw)
            except ValueError:
                raise ValueError(f'{name}={raw!r} is not a valid {field.type.__name__}') from None
        return cls(**values)

    @classmethod
    def variables(cls):
        """The names of every environment variable the service reads."""
        return [field.name.upper() for field in dataclasses.fields(cls)]

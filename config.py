"""Every setting of the service, read from the environment in this one place and checked
when it is read: a bad value stops the service at start with one line naming it.

`python config.py [COMMAND ...]` checks every setting, then runs COMMAND in its place:
`make run` and the image start gunicorn so, since gunicorn reads WEB_CONCURRENCY and
FORWARDED_ALLOW_IPS when it is imported, before gunicorn.conf.py can check them.
"""

import dataclasses
import email.policy
import ipaddress
import math
import os
import re
import sys
import urllib.parse

import limits


class ConfigError(ValueError):
    """A setting has a value the service cannot run with; the message names it."""


def _flag(value):
    value = value.strip().lower()
    if value in ('1', 'true', 'yes', 'on'):
        return True
    if value in ('0', 'false', 'no', 'off'):
        return False
    raise ValueError(value)


_PARSERS = {str: str, int: int, float: float, bool: _flag}


def parse_networks(spec):
    """gunicorn's forwarded_allow_ips syntax: comma-separated addresses or networks, or '*'."""
    items = [item.strip() for item in spec.split(',') if item.strip()]
    return [ipaddress.ip_network(item, strict=False) for item in items if item != '*'] + (
        [ipaddress.ip_network('0.0.0.0/0'), ipaddress.ip_network('::/0')] if '*' in items else [])


def rate_limiting_enabled(limit):
    return limit.strip().lower() not in ('', '0', 'off')


def parse_mail_from(mail_from):
    """MAIL_FROM (`Name <address>` or a bare address) as (display name, ASCII address), or
    None when it is not exactly one such address."""
    if any(char in mail_from for char in '\r\n\0'):
        return None
    header = email.policy.default.header_factory('From', mail_from)
    if header.defects or len(header.addresses) != 1:
        return None
    address = header.addresses[0]
    if not (address.username and address.domain and address.addr_spec.isascii()):
        return None
    return address.display_name, address.addr_spec


# --- Rules: each returns True when the value is acceptable ------------------------------------

def _at_least(low):
    return lambda value: math.isfinite(value) and value >= low


def _positive(value):
    return math.isfinite(value) and value > 0


def _parses(parse):
    def check(value):
        try:
            parse(value)
        except (ValueError, TypeError):
            return False
        return True
    return check


def _rate_limit(value):
    return not rate_limiting_enabled(value) or _parses(limits.parse)(value)


REDIS_SCHEMES = re.compile(r'(redis|rediss|redis\+unix|redis\+sentinel|redis\+cluster)://')


def _storage(value):
    return value in ('instance://', 'memory://') or bool(REDIS_SCHEMES.match(value)) and _parses(
        lambda url: urllib.parse.urlsplit(url).port)(value)


DATABASE_SCHEMES = re.compile(r'(sqlite|postgres|postgresql|mysql)(\+pool)?://')


def _invalid(field, shown):
    rule = field.metadata.get('rule', f'a {field.type.__name__}')
    return ConfigError(f'{field.name.upper()}={shown!r} is not valid: expected {rule}')


def _check(field, value, shown=None):
    """Raise ConfigError naming the variable when `value` breaks its field's rule."""
    check = field.metadata.get('check')
    if check and not check(value):
        raise _invalid(field, value if shown is None else shown)


def _setting(default, rule, check):
    """A field whose value must pass `check`; `rule` says what is allowed, for the error."""
    return dataclasses.field(default=default, metadata={'rule': rule, 'check': check})


@dataclasses.dataclass(frozen=True)
class Config:
    """The service's settings; each default is the one the README documents."""

    database_url: str = _setting('sqlite:///data/persons.db',
                                 'a sqlite://, postgresql:// or mysql:// URL (+pool allowed)',
                                 lambda value: bool(DATABASE_SCHEMES.match(value)))
    smtp_host: str = _setting('localhost', 'a host name', lambda value: bool(value.strip()))
    smtp_port: int = _setting(1025, 'a port from 1 to 65535', lambda value: 1 <= value <= 65535)
    smtp_username: str = ''
    smtp_password: str = ''
    smtp_starttls: bool = False
    smtp_timeout: float = _setting(10.0, 'more than 0 seconds', _positive)
    mail_from: str = _setting('Person API <no-reply@personapi.local>',
                              'one address, as "Name <user@example.com>" or user@example.com',
                              lambda value: parse_mail_from(value) is not None)
    mail_max_backoff: float = _setting(60.0, 'at least 1 second', _at_least(1))
    mail_concurrency: int = _setting(4, 'at least 1', _at_least(1))  # SMTP sessions per worker
    mail_give_up_after: float = _setting(3 * 24 * 3600.0, 'more than 0 seconds', _positive)
    mail_failed_retention: float = _setting(7 * 24 * 3600.0, 'more than 0 seconds', _positive)
    rate_limit: str = _setting('60/minute', 'off, or a limit such as 60/minute', _rate_limit)
    rate_limit_storage: str = _setting('instance://', "instance:// (this instance's workers "
                                       'share the counts; memory:// is its former name) or '
                                       'redis://host:port/db', _storage)
    api_token: str = _setting('', 'empty, or visible ASCII characters without spaces',
                              lambda value: value == '' or (value.isascii() and value.isprintable()
                                                            and ' ' not in value))
    body_timeout: float = _setting(10.0, 'more than 0 seconds', _positive)
    # Seconds from a request head's first byte to its end (see worker.py).
    header_timeout: float = _setting(10.0, 'more than 0 seconds', _positive)
    # Proxies whose X-Forwarded-For is believed; none by default.
    forwarded_allow_ips: str = _setting('', "addresses or networks, comma-separated, or '*'",
                                        _parses(parse_networks))
    web_concurrency: int = _setting(0, '0 (one per core) or more', _at_least(0))
    metrics: bool = True  # serve GET /metrics (Prometheus)
    log_format: str = _setting('text', 'text or json', lambda value: value in ('text', 'json'))
    require_if_match: bool = False  # PUT, PATCH and DELETE without If-Match are 428
    # Seconds a POST's Idempotency-Key is remembered.
    idempotency_ttl: float = _setting(86400.0, 'more than 0 seconds', _positive)

    def __post_init__(self):
        for field in dataclasses.fields(self):
            _check(field, getattr(self, field.name))

    @classmethod
    def from_env(cls, environ=None):
        """Build the settings from `environ` (default: the process environment)."""
        environ = os.environ if environ is None else environ
        values = {}
        for field in dataclasses.fields(cls):
            raw = environ.get(field.name.upper(), '')
            if raw == '':
                continue
            try:
                values[field.name] = _PARSERS[field.type](raw)
            except ValueError:
                raise _invalid(field, raw) from None
            _check(field, values[field.name], raw)
        return cls(**values)

    @classmethod
    def from_env_or_exit(cls):
        """The settings, or exit with one line naming the bad one (for the entry points)."""
        try:
            return cls.from_env()
        except ConfigError as error:
            print(f'personapi: {error}', file=sys.stderr)
            sys.exit(2)

    @classmethod
    def variables(cls):
        """The names of every environment variable the service reads."""
        return [field.name.upper() for field in dataclasses.fields(cls)]


if __name__ == '__main__':
    Config.from_env_or_exit()
    if sys.argv[1:]:
        os.execvp(sys.argv[1], sys.argv[1:])

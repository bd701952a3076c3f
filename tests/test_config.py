"""Settings: every variable is checked when it is read, and a bad one stops the service
with one line that names it, before any worker starts."""

import json
import os
import re
import subprocess
import sys

import pytest

from config import Config, ConfigError
from support import ROOT, free_port

BAD_VALUES = [
    ('DATABASE_URL', 'persons.db'), ('DATABASE_URL', 'oracle://db/x'),
    ('SMTP_HOST', ' '), ('SMTP_PORT', '0'), ('SMTP_PORT', '70000'), ('SMTP_PORT', 'smtp'),
    ('SMTP_STARTTLS', 'maybe'), ('SMTP_TIMEOUT', '0'), ('SMTP_TIMEOUT', '-1'),
    ('SMTP_TIMEOUT', 'nan'), ('SMTP_TIMEOUT', 'inf'),
    ('MAIL_FROM', 'nobody'), ('MAIL_FROM', 'a@example.com, b@example.com'),
    ('MAIL_FROM', 'Zoë <zoë@example.com>'), ('MAIL_FROM', 'x@example.com\r\nBcc: y@example.com'),
    ('MAIL_MAX_BACKOFF', '0'), ('MAIL_MAX_BACKOFF', '0.5'), ('MAIL_CONCURRENCY', '0'),
    ('MAIL_CONCURRENCY', '1.5'), ('MAIL_GIVE_UP_AFTER', '0'), ('MAIL_FAILED_RETENTION', '-5'),
    ('RATE_LIMIT', '2/fortnight'), ('RATE_LIMIT', 'lots'), ('RATE_LIMIT_STORAGE', 'redis'),
    ('RATE_LIMIT_STORAGE', 'postgres://x'), ('RATE_LIMIT_STORAGE', 'memory:/'),
    ('RATE_LIMIT_STORAGE', 'redis://cache:port/0'), ('API_TOKEN', 'two words'), ('API_TOKEN', 'tökén'),
    ('BODY_TIMEOUT', '-1'), ('BODY_TIMEOUT', '0'), ('HEADER_TIMEOUT', '0'), ('HEADER_TIMEOUT', 'nan'),
    ('FORWARDED_ALLOW_IPS', '10.0.0.300'),
    ('FORWARDED_ALLOW_IPS', 'proxy.example'), ('WEB_CONCURRENCY', '-1'),
    ('METRICS', 'sometimes'), ('LOG_FORMAT', 'xml'), ('LOG_FORMAT', 'JSON'),
    ('REQUIRE_IF_MATCH', 'sometimes'), ('IDEMPOTENCY_TTL', '0'), ('IDEMPOTENCY_TTL', 'a day'),
]


@pytest.mark.parametrize('name, value', BAD_VALUES)
def test_a_bad_setting_is_refused_with_its_name_and_value(name, value):
    with pytest.raises(ConfigError) as refused:
        Config.from_env({name: value})
    assert str(refused.value).startswith(f'{name}={value!r} is not valid: expected ')


def test_every_variable_has_a_bad_value_in_the_table():
    """A new setting must come with its check, and with a case here."""
    checked = {name for name, _ in BAD_VALUES}
    unchecked = {'SMTP_USERNAME', 'SMTP_PASSWORD'}  # any text is a valid user name or password
    assert checked | unchecked == set(Config.variables())


@pytest.mark.parametrize('environ', [
    {}, {'SMTP_PORT': '25', 'SMTP_STARTTLS': 'yes', 'MAIL_FROM': 'ops@example.com'},
    {'MAIL_FROM': 'Zoë Service <zoe@example.com>', 'RATE_LIMIT': 'off', 'API_TOKEN': 'x-Y_9.z'},
    {'RATE_LIMIT': '10/second', 'RATE_LIMIT_STORAGE': 'redis://127.0.0.1:6379/0',
     'FORWARDED_ALLOW_IPS': '10.0.0.0/8, 127.0.0.1', 'DATABASE_URL': 'mysql+pool://u@h/db'},
    {'FORWARDED_ALLOW_IPS': '*', 'MAIL_MAX_BACKOFF': '1.5', 'WEB_CONCURRENCY': '0',
     'RATE_LIMIT_STORAGE': 'instance://'},
    {'REQUIRE_IF_MATCH': '1', 'IDEMPOTENCY_TTL': '90.5'},
])
def test_good_settings_are_taken(environ):
    config = Config.from_env(environ)
    for name, value in environ.items():
        assert str(getattr(config, name.lower())).lower() in (value.lower(), 'true')


@pytest.mark.parametrize('name, value', [('MAIL_CONCURRENCY', '0'), ('RATE_LIMIT', '2/fortnight'),
                                         ('BODY_TIMEOUT', '-1'), ('SMTP_TIMEOUT', '0')])
def test_gunicorn_refuses_to_start_with_a_bad_setting(tmp_path, name, value):
    env = {**os.environ, 'DATABASE_URL': f'sqlite:///{tmp_path}/persons.db', name: value}
    result = subprocess.run([sys.executable, '-m', 'gunicorn', '--bind', f'127.0.0.1:{free_port()}'],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    with pytest.raises(ConfigError) as refused:
        Config.from_env({name: value})
    assert result.stderr.strip().splitlines() == [f'personapi: {refused.value}']
    assert not (tmp_path / 'persons.db').exists()  # stopped before touching anything


@pytest.mark.parametrize('command', [['mailer.py', 'status'], ['models.py', 'migrate']])
def test_the_operator_commands_refuse_a_bad_setting_in_one_line(command):
    env = {**os.environ, 'SMTP_PORT': 'twenty-five'}
    result = subprocess.run([sys.executable, *command], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.strip() == ("personapi: SMTP_PORT='twenty-five' is not valid: "
                                     'expected a port from 1 to 65535')


# What gunicorn reads when it is imported, before gunicorn.conf.py runs.
GUNICORNS_OWN = [('WEB_CONCURRENCY', 'abc'), ('WEB_CONCURRENCY', '-1'),
                 ('FORWARDED_ALLOW_IPS', '10.0.0.300')]
IMAGE_COMMAND = json.loads(re.search(r'^CMD (.*)$', (ROOT / 'Dockerfile').read_text(),
                                     re.MULTILINE).group(1))


@pytest.mark.parametrize('name, value', GUNICORNS_OWN)
@pytest.mark.parametrize('start', ['make run', 'the image'])
def test_the_start_commands_check_gunicorns_own_settings_first(tmp_path, start, name, value):
    if start == 'make run' and not (ROOT / '.venv/bin/python').exists():
        pytest.skip('no .venv/bin/python: make test makes it')
    # -o: the virtualenv as it is, even if a requirements file is newer
    command = (['make', '-s', '-o', '.venv/bin/.installed', 'run', f'PORT={free_port()}']
               if start == 'make run' else IMAGE_COMMAND)
    bin_folder = os.path.dirname(sys.executable)  # the image has its venv first on PATH
    # As a user's shell starts it, not as a make inside `make test` (MAKELEVEL and its kin)
    outer_make = ('MAKELEVEL', 'MAKEFLAGS', 'MFLAGS')
    env = {**{key: value for key, value in os.environ.items() if key not in outer_make},
           'DATABASE_URL': f'sqlite:///{tmp_path}/persons.db', name: value,
           'PATH': f'{bin_folder}:{os.environ["PATH"]}'}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0
    with pytest.raises(ConfigError) as refused:
        Config.from_env({name: value})
    # make adds a line of its own ("make: *** [Makefile:..: run] Error 2")
    assert [line for line in result.stderr.splitlines() if not line.startswith('make: ')] == [
        f'personapi: {refused.value}']
    assert not (tmp_path / 'persons.db').exists()


@pytest.mark.parametrize('name, value', GUNICORNS_OWN)
def test_a_bare_gunicorn_prints_for_its_own_settings_what_the_docs_say(tmp_path, name, value):
    env = {**os.environ, 'DATABASE_URL': f'sqlite:///{tmp_path}/persons.db', name: value}
    result = subprocess.run([sys.executable, '-m', 'gunicorn', 'personapi:app'], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=60)
    last_line = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1
    assert f'`{name}={value}`: `{last_line}`' in (ROOT / 'docs' / 'operating.md').read_text()

"""Fuzz a real gunicorn service with schemathesis, from the service's own /openapi.json.

Bounded and repeatable: a fixed seed and a fixed number of cases per operation. Every check
runs but positive_data_acceptance: OpenAPI cannot say that a body's "id" must equal the
path's, nor what email-validator accepts, so some schema-valid bodies are rightly refused.
The rest of the settings are in schemathesis.toml, beside this file.
"""

import subprocess
import sys
import tempfile

from support import ROOT, Service

EXAMPLES_PER_OPERATION = 150
SEED = 20261129
CONFIG = ROOT / 'tests' / 'schemathesis.toml'


def main():
    with tempfile.TemporaryDirectory() as folder:
        env = {'DATABASE_URL': f'sqlite:///{folder}/fuzz.db', 'RATE_LIMIT': 'off',
               'SMTP_PORT': '1'}  # no mail server: delivery just retries in the background
        service = Service(env, workers=2).start()
        try:
            return subprocess.run(
                [sys.executable, '-m', 'schemathesis.cli', '--config-file', str(CONFIG), 'run',
                 f'{service.url}/openapi.json',
                 '--checks', 'all', '--exclude-checks', 'positive_data_acceptance',
                 '--seed', str(SEED), '--max-examples', str(EXAMPLES_PER_OPERATION),
                 '--generation-database', 'none', '--no-color',
                 '--request-timeout', '10'], cwd=folder, timeout=180).returncode
        finally:
            service.kill()


if __name__ == '__main__':
    sys.exit(main())

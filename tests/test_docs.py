"""What a newcomer reads: the links at /, Swagger UI at /docs (served by the service itself,
tried out in a real headless browser), the OpenAPI document's examples, and the examples of
the README and of the pages under docs/, each run against a live service."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import urllib.parse

import pytest

from support import ROOT, Service, free_port, one_engine, wait_until

README = ROOT / 'README.md'
# The README first, then every page under docs/: each page's examples run on a fresh service.
PAGES = [README, *sorted((ROOT / 'docs').glob('*.md'))]
JSON = 'application/json'
PERSON_OPERATIONS = ['listPersons', 'createPerson', 'getPerson', 'replacePerson', 'patchPerson',
                     'deletePerson']


@one_engine
def test_the_root_links_to_the_docs_and_the_document(client):
    links = client.get('/').json
    assert links == {'title': 'Person API', 'docs': '/docs', 'openapi': '/openapi.json'}
    for path in (links['docs'], links['openapi']):
        client.get(path, status=200)


def docs_page_references(client):
    """Every URL the /docs page refers to, in attributes or in its script."""
    page = client.get('/docs').text
    return re.findall(r'''(?:src|href)="([^"]*)"|url: '([^']*)\'''', page), page


@one_engine
def test_the_docs_page_loads_nothing_from_another_host(client):
    references, page = docs_page_references(client)
    urls = [url for pair in references for url in pair if url]
    assert len(urls) == 4  # the style sheet, the icon, the script, the document
    assert all(url.startswith('/') and not url.startswith('//') for url in urls)
    assert not re.search(r'(https?:)?//', page)
    policy = client.get('/docs').headers['Content-Security-Policy']
    assert policy.startswith("default-src 'self';") and 'http' not in policy
    for url in urls:
        client.get(url, status=200)


@one_engine
def test_swagger_ui_files_are_cached_and_the_api_is_not(client):
    references, _ = docs_page_references(client)
    for url in [src for src, _ in references if src]:
        assert client.get(url).headers['Cache-Control'] == 'public, max-age=31536000, immutable'
    assert client.get('/docs').headers['Cache-Control'] == 'no-cache'
    for path, status in [('/', 200), ('/openapi.json', 200), ('/person/1', 404),
                         ('/docs/swagger-ui-0.0.0/swagger-ui.css', 404)]:
        assert client.get(path, status=status).headers['Cache-Control'] == 'no-store'


@one_engine
@pytest.mark.parametrize('name', ['index.html', 'swagger-initializer.js', '..%2Fswagger-ui.css',
                                  'swagger-ui.js.map', '%2e%2e', 'LICENSE'])
def test_only_the_pages_own_files_are_served(client, name):
    references, _ = docs_page_references(client)
    folder = references[0][0].rpartition('/')[0]
    response = client.get(f'{folder}/{name}', status=404)
    assert response.content_type == 'application/json'


@pytest.fixture
def live(tmp_path):
    """A fresh service on an empty SQLite database, as `make run` serves it."""
    service = Service({'DATABASE_URL': f'sqlite:///{tmp_path}/persons.db', 'SMTP_PORT': '1'},
                      workers=1).start()
    yield service
    service.kill()


CHROMIUM = '/usr/bin/chromium'  # Debian's: Playwright drives it, and downloads no browser
# This machine's network refuses anything but loopback: no call home, no update.
CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu', '--disable-background-networking',
                 '--disable-component-update', '--disable-sync', '--no-first-run']


@pytest.fixture
def browser_page():
    if not os.path.exists(CHROMIUM):
        message = 'chromium is not installed (apt-get install chromium)'
        if os.environ.get('CI'):
            pytest.fail(message)  # CI installs it: a skip there would hide a broken /docs
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(30_000)
            yield page
        finally:
            browser.close()


def test_swagger_ui_tries_out_post_person_with_the_example(live, browser_page):
    """Try it out fills the body with the example (not symbols made up from Name's pattern),
    and Execute registers that person."""
    example = live.request('GET', '/openapi.json')[2]['components']['schemas']['PersonCreate'][
        'example']
    browser_page.goto(f'{live.url}/docs')
    for operation in PERSON_OPERATIONS:
        browser_page.locator(f'#operations-default-{operation}').wait_for()
    create = browser_page.locator('#operations-default-createPerson')
    create.locator('.opblock-summary').click()
    create.get_by_role('button', name='Try it out').click()
    assert json.loads(create.locator('textarea.body-param__text').input_value()) == example
    create.get_by_role('button', name='Execute').click()
    status = create.locator('.live-responses-table tbody .response-col_status').first
    status.wait_for()
    assert status.inner_text().strip() == '201'
    answer = create.locator('.live-responses-table tbody .response-col_description pre').first
    assert json.loads(answer.inner_text()) == {'id': 1, **example}
    assert live.request('GET', '/person/1')[2] == {'id': 1, 'email': example['email']}


# --- The OpenAPI document's examples --------------------------------------------------------

# A person's life, in the order its operations' examples are sent to a fresh service.
LIFE = [('post', '/person'), ('get', '/person'), ('get', '/person/{person_id}'),
        ('patch', '/person/{person_id}'), ('put', '/person/{person_id}'),
        ('delete', '/person/{person_id}')]


def resolved(document, schema):
    while '$ref' in schema:
        reference, schema = schema['$ref'], document
        for part in reference.split('/')[1:]:
            schema = schema[part]
    return schema


def all_examples(node):
    """Every `example` in the document, wherever it is."""
    if isinstance(node, dict):
        yield from ([node['example']] if 'example' in node else [])
        for key, value in node.items():
            yield from all_examples(value) if key != 'example' else ()
    elif isinstance(node, list):
        for item in node:
            yield from all_examples(item)


def test_every_example_in_the_document_is_a_real_request(live):
    """Each operation's request example (path id and body) gets the documented success and
    its example answer, in a person's life; the documented errors come of real requests."""
    document = live.request('GET', '/openapi.json')[2]
    person_id = resolved(document, document['paths']['/person/{person_id}']['parameters'][0][
        'schema'])['example']
    checked = [person_id]
    for method, template in LIFE:
        operation = document['paths'][template][method]
        body = None
        if 'requestBody' in operation:
            body = resolved(document, operation['requestBody']['content'][JSON]['schema'])['example']
            checked.append(body)
        (status, response), = [(code, response) for code, response in operation['responses'].items()
                               if code.startswith('2')]
        answer = response.get('content', {}).get(JSON, {}).get('example')
        query = {parameter['name']: parameter['example']
                 for parameter in operation.get('parameters', [])
                 if parameter['in'] == 'query' and 'example' in parameter}
        checked += query.values()
        path = template.replace('{person_id}', str(person_id))
        path += f'?{urllib.parse.urlencode(query)}' if query else ''
        assert live.request(method.upper(), path, body)[::2] == (int(status), answer), method
        checked += [answer, resolved(document, response.get('content', {}).get(JSON, {}).get(
            'schema', {})).get('example')]
    ada = resolved(document, document['components']['schemas']['PersonCreate'])['example']
    gone = live.request('GET', f'/person/{person_id}')
    assert live.request('POST', '/person', ada)[0] == 201  # Ada again, to be refused again
    for (status, _, answer), (method, template) in [
            (gone, ('get', '/person/{person_id}')),
            (live.request('POST', '/person', ada), ('post', '/person')),
            (live.request('POST', '/person', {'first_name': '', 'email': 'nope'}),
             ('post', '/person'))]:
        documented = document['paths'][template][method]['responses'][str(status)]
        example = documented['content'][JSON]['example']
        assert answer == {**example, 'request_id': answer['request_id']}
        checked.append(example)
    unchecked = [example for example in all_examples(document) if example not in checked]
    assert not unchecked


# --- The examples of the README and docs/ -------------------------------------------------

# What differs from run to run, masked alike in the README and in the real output.
VARYING = [(re.compile(r'\b[0-9a-f]{12}-\d+\b'), '<request id>'),
           (re.compile(r'^(Date|Message-ID|X-Peer): .*$', re.MULTILINE), r'\1: <varies>'),
           (re.compile(r'cursor=[A-Za-z0-9_-]{32}'), 'cursor=<made with the database\'s key>')]
ELIDED = '…'  # a line that stands for headers left out of a `curl -i` output


def blocks(page):
    text = page.read_text(encoding='utf-8')
    return re.findall(r'^```\n(.*?)^```$', text, re.MULTILINE | re.DOTALL)


def curl_examples(page):
    """(command, output) for each `$ curl` in the page's code blocks, in order."""
    examples = []
    for block in blocks(page):
        for chunk in re.split(r'^\$ ', block, flags=re.MULTILINE)[1:]:
            lines = chunk.rstrip('\n').split('\n')
            command = lines.pop(0)
            while command.endswith('\\'):
                command = command[:-1] + lines.pop(0)
            examples.append((command, '\n'.join(lines).strip('\n')))
    return examples


def masked(text):
    for pattern, replacement in VARYING:
        text = pattern.sub(replacement, text)
    return text


def assert_same_output(expected, actual, command):
    expected, actual = masked(expected), masked(actual.replace('\r\n', '\n').strip('\n'))
    if not expected.startswith('HTTP/'):
        assert actual == expected, command
        return
    expected_head, _, expected_body = expected.partition('\n\n')
    actual_head, _, actual_body = actual.partition('\n\n')
    (status, *shown), (actual_status, *headers) = expected_head.split('\n'), actual_head.split('\n')
    assert (actual_status, actual_body) == (status, expected_body), command
    assert headers_shown(shown).fullmatch(''.join(f'{line.lower()}\n' for line in headers)), (
        f'{command}: the headers shown, in the order sent, with {ELIDED} where some are left out:'
        f'\n' + '\n'.join(headers))


def headers_shown(shown):
    """A pattern for the headers a sample shows: each line as written (names in any case),
    in order, and an ELIDED line for one or more left out."""
    return re.compile(''.join(r'(?:[^\n]*\n)+' if line == ELIDED else re.escape(f'{line.lower()}\n')
                              for line in shown))


def test_the_readme_shows_curl_examples():
    commands = [command for command, _ in curl_examples(README)]
    assert len(commands) >= 10 and all(command.startswith('curl ') for command in commands)


@pytest.mark.parametrize('page', [page for page in PAGES if curl_examples(page)],
                         ids=lambda page: page.name)
def test_the_curl_examples_print_what_the_page_shows(live, page):
    for command, expected in curl_examples(page):
        result = subprocess.run(['bash', '-c', command.replace('localhost:8000', live.url)],
                                capture_output=True, text=True, timeout=30)
        assert_same_output(expected, result.stdout, command)


def test_the_readmes_mail_is_what_make_mailsink_prints(tmp_path):
    (expected,) = [block for block in blocks(README) if 'MESSAGE FOLLOWS' in block]
    port, printed = free_port(), tmp_path / 'mailsink.txt'
    with open(printed, 'w') as output:  # the command `make mailsink` runs
        sink = subprocess.Popen([sys.executable, '-u', '-m', 'aiosmtpd', '-n', '-l',
                                 f'127.0.0.1:{port}'], stdout=output)
    service = Service({'DATABASE_URL': f'sqlite:///{tmp_path}/persons.db',
                       'SMTP_HOST': '127.0.0.1', 'SMTP_PORT': str(port)}, workers=1)
    try:
        assert wait_until(lambda: port_open(port))
        service.start()
        (command, _), *_ = curl_examples(README)
        subprocess.run(['bash', '-c', command.replace('localhost:8000', service.url)],
                       capture_output=True, check=True, timeout=30)
        assert wait_until(lambda: 'END MESSAGE' in printed.read_text(), timeout=20)
    finally:
        service.kill()
        sink.kill()
        sink.wait()
    assert masked(printed.read_text().strip('\n')) == masked(expected.strip('\n'))


def port_open(port):
    try:
        socket.create_connection(('127.0.0.1', port), timeout=1).close()
        return True
    except OSError:
        return False


# --- The operator's commands, as written --------------------------------------------------

# A project script run by a Python: `.venv/bin/python mailer.py status`, `python models.py ...`
PYTHON_COMMAND = re.compile(r'([\w./]*python3?) ((?:bench/)?\w+\.py[^`#\n]*)')
VENV_PYTHON = '.venv/bin/python'
# The ones that change nothing, run as written on a fresh database.
HARMLESS = {'mailer.py status', 'mailer.py failed', 'models.py migrate'}


def python_commands():
    """(page, line, interpreter, script and arguments) for each in the README and docs/."""
    for page in PAGES:
        for line in page.read_text(encoding='utf-8').splitlines():
            for interpreter, command in PYTHON_COMMAND.findall(line):
                yield page.name, line, interpreter, command.strip()


def test_the_docs_run_the_projects_scripts_with_the_virtualenvs_python():
    """A fresh clone's `python` lacks the dependencies; in the pod `python` is the venv's."""
    commands = list(python_commands())
    assert len(commands) >= 6
    for page, line, interpreter, _ in commands:
        assert interpreter == VENV_PYTHON or 'kubectl exec' in line, f'{page}: {line}'


def test_the_operators_commands_run_as_written(tmp_path):
    if not (ROOT / VENV_PYTHON).exists():
        pytest.skip(f'no {VENV_PYTHON}: make test makes it')
    commands = {command for _, _, interpreter, command in python_commands()
                if interpreter == VENV_PYTHON and command.strip() in HARMLESS}
    assert len(commands) == len(HARMLESS)
    env = {**os.environ, 'DATABASE_URL': f'sqlite:///{tmp_path}/persons.db'}
    for command in sorted(commands, key=lambda command: 'migrate' not in command):
        result = subprocess.run(f'{VENV_PYTHON} {command}', shell=True, cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, (command, result.stderr)


def test_make_clean_leaves_the_tree_as_a_fresh_clone_has_it(tmp_path):
    """Whatever .gitignore says the targets and tests make, `make clean` removes."""
    listed = subprocess.run(['git', 'ls-files', '--cached', '--others', '--exclude-standard'],
                            cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    tree = tmp_path / 'tree'
    for name in listed:
        if (ROOT / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, tree / name)
    clean = {str(path.relative_to(tree)) for path in tree.rglob('*') if path.is_file()}
    for pattern in (ROOT / '.gitignore').read_text().split():
        name = pattern.strip('/').replace('*', 'generated')
        places = [name] if pattern.startswith('/') else [name, f'tests/{name}']  # anywhere
        for place in places:
            made = tree / place / 'generated' if pattern.endswith('/') else tree / place
            made.parent.mkdir(parents=True, exist_ok=True)
            made.write_text('made by a target')
    subprocess.run(['make', '-s', 'clean'], cwd=tree, check=True, timeout=60)
    assert {str(path.relative_to(tree)) for path in tree.rglob('*') if path.is_file()} == clean

"""The HTTP contract, in-process through WebTest: every route and every error row."""

import json
import re
import shutil
import subprocess
import urllib.parse

import pytest

import models
import personapi
from models import Outbox, Person
from support import one_engine

ADA = {'first_name': 'Ada', 'last_name': 'Lovelace', 'email': 'ada@example.com'}
GRACE = {'first_name': 'Grace', 'last_name': 'Hopper', 'email': 'grace@example.com'}


def post(client, body, status=201, **options):
    return client.post_json('/person', body, status=status, **options)


def send(client, method, path, raw, content_type='application/json', status='*'):
    """A request with a raw body, for what post_json cannot express."""
    return client.request(path, method=method, body=raw, status=status,
                          headers={'Content-Type': content_type} if content_type else {})


def snapshot():
    return (sorted(Person.select().tuples()), Outbox.select().count())


# --- Success paths --------------------------------------------------------------------------

def test_post_creates_a_person_and_queues_one_welcome_mail(client):
    response = post(client, ADA)
    person_id = response.json['id']
    assert response.json == {'id': person_id, **ADA}
    assert response.headers['Location'].endswith(f'/person/{person_id}')
    assert [row.person_id for row in Outbox.select()] == [person_id]


def test_post_accepts_the_collection_path_with_a_trailing_slash(client):
    assert client.post_json('/person/', ADA, status=201).json['email'] == ADA['email']


def test_get_returns_only_id_and_email(client):
    person_id = post(client, ADA).json['id']
    assert client.get(f'/person/{person_id}').json == {'id': person_id, 'email': ADA['email']}


@pytest.mark.parametrize('email', ['o\'brien+tag@example.com', 'ñoño@example.com',
                                   'δοκιμή@παράδειγμα.δοκιμή', '用户@例子.广告'])
def test_get_sends_the_json_the_encoder_would(client, email):
    person_id = post(client, {**ADA, 'email': email}).json['id']
    stored = Person.get_by_id(person_id).email
    response = client.get(f'/person/{person_id}')
    assert response.content_type == 'application/json'
    assert response.body == json.dumps({'id': person_id, 'email': stored},
                                       ensure_ascii=False).encode()


@pytest.mark.parametrize('text', ['', 'plain', 'quote " backslash \\ slash /', 'line\nbreak\ttab',
                                  '\x00\x1f\x7f', '\u2028\u2029', 'ünï 用户 🙂', '\ud800'])
def test_the_get_document_escapes_as_the_json_encoder_does(text):
    assert personapi.summary_json(7, text) == personapi.encode_json({'id': 7, 'email': text})
    assert json.loads(personapi.summary_json(7, text)) == {'id': 7, 'email': text}


def test_put_replaces_every_field(client):
    person_id = post(client, ADA).json['id']
    response = client.put_json(f'/person/{person_id}', GRACE)
    assert response.json == {'id': person_id, **GRACE}
    assert client.get(f'/person/{person_id}').json['email'] == GRACE['email']


def test_put_accepts_the_path_id_in_the_body(client):
    person_id = post(client, ADA).json['id']
    assert client.put_json(f'/person/{person_id}', {'id': person_id, **GRACE}).json['id'] == person_id


def test_put_may_keep_the_persons_own_email_in_another_case(client):
    person_id = post(client, ADA).json['id']
    changed = {**ADA, 'email': 'ADA@example.com'}
    assert client.put_json(f'/person/{person_id}', changed).json['email'] == 'ADA@example.com'


@pytest.mark.parametrize('patch, expected', [
    ({}, ADA),
    ({'first_name': 'Augusta'}, {**ADA, 'first_name': 'Augusta'}),
    ({'email': 'countess@example.com', 'last_name': 'King'},
     {**ADA, 'email': 'countess@example.com', 'last_name': 'King'}),
])
def test_patch_merges_the_given_fields(client, patch, expected):
    person_id = post(client, ADA).json['id']
    response = client.patch_json(f'/person/{person_id}', patch)
    assert response.json == {'id': person_id, **expected}
    assert Person.get_by_id(person_id).first_name == expected['first_name']


def test_patch_accepts_the_merge_patch_media_type(client):
    person_id = post(client, ADA).json['id']
    response = send(client, 'PATCH', f'/person/{person_id}', b'{"last_name": "Byron"}',
                    content_type='application/merge-patch+json', status=200)
    assert response.json['last_name'] == 'Byron'


def test_put_and_patch_send_no_mail(client):
    person_id = post(client, ADA).json['id']
    client.put_json(f'/person/{person_id}', GRACE)
    client.patch_json(f'/person/{person_id}', {'first_name': 'Amazing'})
    assert Outbox.select().count() == 1


def test_delete_removes_the_person(client):
    person_id = post(client, ADA).json['id']
    response = client.delete(f'/person/{person_id}', status=204)
    assert response.body == b''
    client.get(f'/person/{person_id}', status=404)
    client.delete(f'/person/{person_id}', status=404)


def test_a_deleted_persons_email_can_register_again(client):
    client.delete(f'/person/{post(client, ADA).json["id"]}', status=204)
    post(client, ADA)


@pytest.mark.parametrize('name', ['José', '李', "O'Brien", 'Anne-Marie', 'Zoë', 'Ōkubo Toshimichi',
                                  'Ünal 😀', 'x' * 100])
def test_names_in_any_script_are_welcome(client, name):
    response = post(client, {**ADA, 'first_name': name, 'last_name': name})
    assert (response.json['first_name'], response.json['last_name']) == (name, name)


# (name, accepted): the validator's rule and the OpenAPI pattern must both give `accepted`.
NAMES = [
    ('Ada', True), (' Ada ', True), ('李', True), ('Zoë', True), ("O'Brien", True), ('-', True),
    ('e\u0301', True),  # a combining mark on a letter
    ('\u0915\u093e', True),  # Devanagari, a spacing vowel sign on a consonant
    ('\u05d3\u05d5\u05d3 2\u200f', True),  # Hebrew with a right-to-left mark: marks stay allowed
    ('Ada\u200bLovelace', True), ('\u0645\u061c1', True),  # invisible, but beside visible ones
    ('\u200b', False), ('\ufeff', False), ('\u00ad', False), ('\u2060', False),
    ('\u200b\u200c\u200d', False), ('\u0301', False), (' \u0301\u0308 ', False),
    ('\u00a0', False), ('\u3000', False), ('\u2003\u2009', False), ('\u3164', False),
    ('\u115f\u1160', False), ('\uffa0', False), ('\u2800', False), ('\u200e', False),
    ('\u200f\u061c', False), ('\ue000', False), ('\u0378', False),
    ('Ada\u202e', False), ('\u202aAda', False), ('A\u202bda\u202c', False), ('\u202dAda', False),
    ('A\u2066da\u2069', False), ('Ada\u2067', False), ('\u2068Ada', False),
    ('Ada\n', False), ('A\tda', False), ('Ada\x00', False), ('Ada\x85', False),
    ('Ada\u2028', False), ('', False), ('   ', False), ('x' * 101, False),
]


@pytest.mark.parametrize('name, accepted', NAMES)
def test_names_need_a_visible_character_and_no_bidi_controls(client, name, accepted):
    before = snapshot()
    for field in ('first_name', 'last_name'):
        response = post(client, {**GRACE, field: name}, status=201 if accepted else 422)
        if accepted:
            client.delete(response.location, status=204)
        else:
            assert response.json['description'].startswith(f'{field}: ')
    assert snapshot()[0] == before[0]


@one_engine  # the document, not the database
@pytest.mark.parametrize('name, accepted', NAMES)
def test_the_openapi_name_pattern_agrees_with_the_validator(client, name, accepted):
    schema = client.get('/openapi.json').json['components']['schemas']['Name']
    # An ECMA `$` (no m flag) is Python's `\Z`; the rest of the pattern reads the same.
    pattern = re.compile(schema['pattern'].removesuffix('$') + r'\Z')
    assert bool(schema['minLength'] <= len(name) <= schema['maxLength']
                and pattern.search(name)) == accepted


@one_engine
@pytest.mark.skipif(not shutil.which('node'), reason='node is not installed: no ECMA engine')
def test_an_ecma_engine_reads_the_name_pattern_as_the_validator(client):
    pattern = client.get('/openapi.json').json['components']['schemas']['Name']['pattern']
    script = ('const [pattern, names] = JSON.parse(require("fs").readFileSync(0, "utf8"));'
              'console.log(JSON.stringify(names.map(name => new RegExp(pattern).test(name))));')
    names = [name for name, _ in NAMES if 1 <= len(name) <= 100]
    verdicts = subprocess.run(['node', '-e', script], input=json.dumps([pattern, names]),
                              capture_output=True, text=True, check=True).stdout
    assert json.loads(verdicts) == [accepted for name, accepted in NAMES if name in names]


def test_names_are_trimmed_and_the_email_domain_lower_cased(client):
    response = post(client, {'first_name': '  Ada ', 'last_name': ' Lovelace',
                             'email': 'Ada.King@Example.ORG'})
    assert response.json == {'id': response.json['id'], 'first_name': 'Ada',
                             'last_name': 'Lovelace', 'email': 'Ada.King@example.org'}


def test_health_and_readiness(client):
    assert client.get('/healthz').json == {'status': 'ok'}
    assert client.get('/readyz').json == {'status': 'ready'}


def test_openapi_documents_every_route_and_its_errors(client):
    document = client.get('/openapi.json').json
    assert document['openapi'].startswith('3.')
    paths = document['paths']
    assert set(paths) == {'/', '/person', '/person/{person_id}', '/healthz', '/readyz',
                          '/openapi.json', '/metrics'}
    assert set(paths['/person/{person_id}']) >= {'get', 'put', 'patch', 'delete'}
    for status in ('201', '400', '409', '413', '415', '422'):
        assert status in paths['/person']['post']['responses']
    assert document['components']['schemas']['PersonCreate']['required'] == [
        'first_name', 'last_name', 'email']


def test_every_get_route_answers_head_with_its_headers_and_no_body(client):
    person = post(client, ADA).json['id']
    asset = re.search(r'src="([^"]+\.js)"', client.get('/docs').text).group(1)
    for path, status in [('/', 200), ('/healthz', 200), ('/readyz', 200), ('/openapi.json', 200),
                         ('/docs', 200), (asset, 200), (f'/person/{person}', 200),
                         ('/person/999', 404), ('/person', 200)]:
        get, head = client.get(path, status=status), client.head(path, status=status)
        assert head.body == b''
        assert head.headers['Content-Length'] == str(len(get.body))
        assert _without_request_id(head.headers) == _without_request_id(get.headers)


def _without_request_id(headers):
    return {name: value for name, value in headers.items() if name.lower() != 'x-request-id'}


# --- Errors: each a JSON body with a title, and nothing changed -------------------------------

# Forms that int() reads as a number, and other non-canonical ids: none addresses a person.
NON_CANONICAL_IDS = ['1_0', '+1', '01', '001', '0x1', '1.0', '1e0', ' 1', '1 ', '\t1', '-0',
                     '\uff11', '\u0661', '\u0967', '\U0001d7cf', '1\n', str(2**63), '9' * 20,
                     '\uff11\uff10']


@pytest.mark.parametrize('person_id', NON_CANONICAL_IDS)
@pytest.mark.parametrize('method', ['GET', 'HEAD', 'PUT', 'PATCH', 'DELETE'])
def test_only_the_canonical_decimal_id_addresses_a_person(client, method, person_id):
    for canonical in (1, 10):  # what int() makes of the forms above
        Person.create(id=canonical, **{**ADA, 'email': f'{canonical}@example.com'},
                      email_key=models.email_key(f'{canonical}@example.com'))
    before = snapshot()
    path = '/person/' + urllib.parse.quote(person_id)
    response = send(client, method, path, json.dumps(GRACE).encode(), status=404)
    assert method == 'HEAD' or response.json['description'] == ID_FORM
    assert snapshot() == before


ID_FORM = ("A person's id is a whole number from 1 to 9223372036854775807, written in decimal "
           'without sign, leading zeros or separators, such as /person/12.')


def test_the_largest_id_is_routed_and_the_next_is_not(client):
    largest = client.get(f'/person/{2**63 - 1}', status=404).json
    assert largest['description'] == f'No person has the id {2**63 - 1}.'
    assert client.get(f'/person/{2**63}', status=404).json['description'] == ID_FORM


NO_ROUTE = 'No route serves this path; /openapi.json lists those there are.'
# (path, what the 404 says)
NOT_FOUND_PATHS = [
    ('/person/999', 'No person has the id 999.'), ('/person/abc', ID_FORM),
    ('/person/-1', ID_FORM), ('/person/0', ID_FORM), ('/person/01', ID_FORM),
    ('/person/1.5', ID_FORM), ('/person/99999999999999999999', ID_FORM), ('/person/%20', ID_FORM),
    ('/person/1/', 'No person has the id 1.'), ('/person/1/mail', NO_ROUTE),
    ('/nowhere', NO_ROUTE), ('/persons', NO_ROUTE), ('/person/abc/def', NO_ROUTE)]


@pytest.mark.parametrize('path, description', NOT_FOUND_PATHS)
@pytest.mark.parametrize('method', ['GET', 'PUT', 'PATCH', 'DELETE'])
def test_unknown_or_malformed_ids_and_paths_are_404_saying_why(client, method, path, description):
    post(client, {**ADA, 'email': 'first@example.com'})
    client.delete('/person/1', status=204)
    before = snapshot()
    response = send(client, method, path, json.dumps(GRACE).encode(), status=404)
    assert response.json['description'] == description
    assert response.json['request_id'] == response.headers['X-Request-ID']
    assert snapshot() == before


INVALID_BODIES = [
    # (body, field named in the description)
    ([ADA], 'object'),
    ('Ada', 'object'),
    (None, 'object'),
    ({'last_name': 'Lovelace', 'email': 'ada@example.com'}, 'first_name'),
    ({'first_name': 'Ada', 'email': 'ada@example.com'}, 'last_name'),
    ({'first_name': 'Ada', 'last_name': 'Lovelace'}, 'email'),
    ({**ADA, 'first_name': None}, 'first_name'),
    ({**ADA, 'first_name': 42}, 'first_name'),
    ({**ADA, 'last_name': ['Lovelace']}, 'last_name'),
    ({**ADA, 'last_name': True}, 'last_name'),
    ({**ADA, 'email': 12}, 'email'),
    ({**ADA, 'nickname': 'Countess'}, 'nickname'),
    ({**ADA, 'id': 5}, 'id'),
    ({**ADA, 'first_name': ''}, 'first_name'),
    ({**ADA, 'first_name': '   '}, 'first_name'),
    ({**ADA, 'last_name': 'x' * 101}, 'last_name'),
    ({**ADA, 'first_name': 'Ada\r\nBcc: victim@example.com'}, 'first_name'),
    ({**ADA, 'first_name': 'Ada\n'}, 'first_name'),
    ({**ADA, 'first_name': 'A\tda'}, 'first_name'),
    ({**ADA, 'first_name': 'Ada\x00'}, 'first_name'),
    ({**ADA, 'last_name': 'Love\x7flace'}, 'last_name'),
    ({**ADA, 'last_name': 'Love\x85lace'}, 'last_name'),
    ({**ADA, 'last_name': 'Love\u2028lace'}, 'last_name'),
    ({**ADA, 'last_name': 'Love\ud800lace'}, 'last_name'),
    ({**ADA, 'email': ''}, 'email'),
    ({**ADA, 'email': 'ada'}, 'email'),
    ({**ADA, 'email': 'ada@'}, 'email'),
    ({**ADA, 'email': '@example.com'}, 'email'),
    ({**ADA, 'email': 'ada@example'}, 'email'),
    ({**ADA, 'email': 'ada..king@example.com'}, 'email'),
    ({**ADA, 'email': 'ada @example.com'}, 'email'),
    ({**ADA, 'email': ' ada@example.com'}, 'email'),
    ({**ADA, 'email': 'ada@example.com\r\nBcc: victim@example.com'}, 'email'),
    ({**ADA, 'email': 'a@b@example.com'}, 'email'),
    ({**ADA, 'email': 'x' * 250 + '@example.com'}, 'email'),
    ({**ADA, 'email': 'ada@' + 'x' * 64 + '.com'}, 'email'),
]


@pytest.mark.parametrize('body, field', INVALID_BODIES)
def test_post_rejects_invalid_bodies_with_422_naming_the_field(client, body, field):
    before = snapshot()
    response = post(client, body, status=422)
    assert field in response.json['description']
    assert snapshot() == before


INVALID_REPLACEMENTS = [(body, field) for body, field in INVALID_BODIES if field != 'id'] + [
    ({**GRACE, 'id': 'one'}, 'id'), ({**GRACE, 'id': True}, 'id'), ({**GRACE, 'id': 10**6}, 'id')]
INVALID_PATCHES = [
    ({'first_name': None}, 'first_name'), ({'email': None}, 'email'),
    ({'last_name': ''}, 'last_name'), ({'email': 'nope'}, 'email'),
    ({'first_name': 'A\nB'}, 'first_name'), ({'age': 3}, 'age'), ({'id': 10**6}, 'id'),
    ([], 'object'), ('x', 'object')]


@pytest.mark.parametrize('method, body, field', [('PUT', *case) for case in INVALID_REPLACEMENTS] +
                                                [('PATCH', *case) for case in INVALID_PATCHES])
def test_put_and_patch_reject_invalid_bodies_and_nulls_with_422(client, method, body, field):
    person_id = post(client, ADA).json['id']
    before = snapshot()
    response = send(client, method, f'/person/{person_id}', json.dumps(body).encode(), status=422)
    assert field in response.json['description']
    assert snapshot() == before


# (body, the problems a 422 lists, in order), sent to POST, PUT and PATCH alike.
SEVERAL_PROBLEMS = [
    ({'first_name': '', 'email': 'nope'},
     [('first_name', 'must be 1 to 100 characters long'), ('last_name', 'is required'),
      ('email', 'is not a valid address (An email address must have an @-sign.)')]),
    ({'email': 7, 'last_name': None, 'first_name': 'A\nB'},
     [('first_name', 'must not contain control characters'),
      ('last_name', 'is required and cannot be null'), ('email', 'must be a string')]),
    ({'nickname': 'Countess', **ADA, 'last_name': 'x' * 101, 'age': 36},
     [('last_name', 'must be 1 to 100 characters long'), ('nickname', 'is not a known field'),
      ('age', 'is not a known field')]),
    ({'id': 'one', 'first_name': ['Ada'], 'last_name': 'Lovelace', 'email': 'ada@'},
     [('id', 'must equal the id in the path'), ('first_name', 'must be a string'),
      ('email', 'is not a valid address (There must be something after the @-sign.)')]),
]


def expected_problems(method, problems):
    """What `problems` become for `method`: a merge patch needs no field, and POST takes no id."""
    if method == 'PATCH':
        problems = [problem for problem in problems if problem[1] != 'is required']
    if method == 'POST':
        problems = [(field, 'is not a known field' if field == 'id' else message)
                    for field, message in problems]
    return problems


@pytest.mark.parametrize('body, problems', SEVERAL_PROBLEMS)
@pytest.mark.parametrize('method', ['POST', 'PUT', 'PATCH'])
def test_a_422_lists_every_problem_in_the_schemas_order(client, method, body, problems):
    path = '/person' if method == 'POST' else f'/person/{post(client, GRACE).json["id"]}'
    before = snapshot()
    response = send(client, method, path, json.dumps(body).encode(), status=422)
    expected = expected_problems(method, problems)
    assert response.json['errors'] == [{'field': field, 'message': message}
                                       for field, message in expected]
    assert response.json['description'] == f'{expected[0][0]}: {expected[0][1]}.'
    assert set(response.json) == {'title', 'description', 'errors', 'request_id'}
    assert snapshot() == before


@pytest.mark.parametrize('body', [[ADA], 'Ada', None, 3])
def test_a_body_that_is_not_an_object_is_one_problem_without_a_field(client, body):
    response = post(client, body, status=422)
    assert response.json['errors'] == [{'field': None, 'message': 'must be a JSON object'}]
    assert response.json['description'] == 'The body must be a JSON object.'


MALFORMED_JSON = [b'', b'{', b'{"first_name": "Ada",}', b"{'first_name': 'Ada'}",
                  b'{"first_name": NaN}', b'{"first_name": Infinity}', b'[-Infinity]',
                  b'{"email": "a@example.com", "email": "b@example.com"}',
                  b'\xff\xfe{}', b'{"first_name": "\xc3\x28"}', b'[' * 30_000 + b']' * 30_000]


@pytest.mark.parametrize('raw', MALFORMED_JSON, ids=lambda raw: repr(raw[:30]))
@pytest.mark.parametrize('method', ['POST', 'PUT', 'PATCH'])
def test_unparseable_json_is_400(client, method, raw):
    path = '/person' if method == 'POST' else f'/person/{post(client, ADA).json["id"]}'
    before = snapshot()
    response = send(client, method, path, raw, status=400)
    assert response.json['title'] == 'Malformed JSON'
    assert snapshot() == before


@pytest.mark.parametrize('content_type', [None, 'text/plain', 'application/x-www-form-urlencoded',
                                          'application/jsonx', 'application/json; charset=latin-1',
                                          'multipart/form-data; boundary=x'])
@pytest.mark.parametrize('method', ['POST', 'PUT', 'PATCH'])
def test_bodies_that_are_not_json_are_415(client, method, content_type):
    path = '/person' if method == 'POST' else f'/person/{post(client, ADA).json["id"]}'
    before = snapshot()
    response = send(client, method, path, json.dumps(GRACE).encode(), content_type=content_type,
                    status=415)
    assert response.json['title']
    assert snapshot() == before


def test_json_with_a_charset_parameter_is_accepted(client):
    response = send(client, 'POST', '/person', json.dumps(ADA).encode(),
                    content_type='application/json; charset=UTF-8', status=201)
    assert response.json['email'] == ADA['email']


@pytest.mark.parametrize('method', ['POST', 'PUT', 'PATCH'])
def test_a_body_over_64_kib_is_413(client, method):
    path = '/person' if method == 'POST' else f'/person/{post(client, ADA).json["id"]}'
    before = snapshot()
    oversized = json.dumps({**GRACE, 'first_name': 'x' * (64 * 1024)}).encode()
    response = send(client, method, path, oversized, status=413)
    assert response.json['title']
    assert snapshot() == before


def test_a_body_of_exactly_64_kib_is_read(client):
    body = json.dumps(ADA).encode()
    padded = body[:-1] + b' ' * (64 * 1024 - len(body)) + b'}'
    assert send(client, 'POST', '/person', padded, status=201).json['email'] == ADA['email']


@pytest.mark.parametrize('email', ['ada@example.com', 'ADA@EXAMPLE.COM', 'Ada@Example.com'])
def test_a_used_email_is_409_whatever_its_case(client, email):
    post(client, ADA)
    before = snapshot()
    response = post(client, {**GRACE, 'email': email}, status=409)
    assert 'email' in response.json['description']
    assert snapshot() == before


def test_addresses_differing_only_in_accents_are_distinct(client):
    post(client, {**ADA, 'email': 'jose@example.com'})
    post(client, {**GRACE, 'email': 'josé@example.com'})
    assert Person.select().count() == 2


@pytest.mark.parametrize('method', ['PUT', 'PATCH'])
def test_taking_another_persons_email_is_409(client, method):
    post(client, ADA)
    grace_id = post(client, GRACE).json['id']
    before = snapshot()
    body = {**GRACE, 'email': 'ADA@example.com'}
    response = send(client, method, f'/person/{grace_id}', json.dumps(body).encode(), status=409)
    assert response.json['title']
    assert snapshot() == before


@pytest.mark.parametrize('method, path, allowed', [
    ('DELETE', '/person', {'GET', 'HEAD', 'POST'}), ('PUT', '/person', {'GET', 'HEAD', 'POST'}),
    ('POST', '/person/1', {'GET', 'HEAD', 'PUT', 'PATCH', 'DELETE'}),
    ('POST', '/healthz', {'GET', 'HEAD'}), ('PUT', '/readyz', {'GET', 'HEAD'}),
    ('DELETE', '/openapi.json', {'GET', 'HEAD'}), ('POST', '/docs', {'GET', 'HEAD'}),
])
def test_other_methods_are_405_with_allow(client, method, path, allowed):
    response = client.request(path, method=method, status=405)
    assert response.json['title']
    assert set(response.headers['Allow'].replace(' ', '').split(',')) - {'OPTIONS'} == allowed


def test_errors_never_leak_a_stack_trace(client):
    for response in (post(client, {'first_name': 1}, status=422),
                     send(client, 'POST', '/person', b'{', status=400),
                     client.get('/person/1', status=404)):
        assert response.content_type == 'application/json'
        assert 'Traceback' not in response.text and 'File "' not in response.text

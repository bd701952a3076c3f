"""The API's description: the OpenAPI 3 document served at /openapi.json, built from the
same limits the validation enforces, and the pages that show it to a person: Swagger UI at
/docs, from files the service serves itself, and links to both at /.
"""

import base64
import functools
import hashlib
import json

import falcon
import swagger_ui_bundle

import names
from models import MAX_EMAIL_LENGTH, MAX_NAME_LENGTH

JSON = 'application/json'
MERGE_PATCH = 'application/merge-patch+json'
PERSON_FIELDS = ('first_name', 'last_name', 'email')
MAX_PERSON_ID = 2**63 - 1  # the largest id every engine's 64-bit integer holds
MAX_IDEMPOTENCY_KEY = 255  # characters, each visible ASCII
LIST_PARAMETERS = ('limit', 'cursor', 'email')  # GET /person's query
DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 20, 100  # persons per page
CURSOR = '[A-Za-z0-9_-]{32}'  # a page's cursor: 24 bytes (an id and its MAC) in base64url

# The document's examples, each a real request on a fresh service (tests/test_docs.py sends
# them in this order: create, list, read, patch, replace, delete), with what it answers.
ADA = {'first_name': 'Ada', 'last_name': 'Lovelace', 'email': 'ada@example.com'}
EXAMPLE_ID = 1
EXAMPLE_PATCH = {'last_name': 'King'}
EXAMPLE_REPLACEMENT = {'first_name': 'Augusta Ada', 'last_name': 'King', 'email': 'ada@example.com'}
EXAMPLE_REQUEST_ID = '8377f9ada105-1'
EXAMPLE_PAGE = {'items': [{'id': EXAMPLE_ID, **ADA}], 'next': None, 'limit': DEFAULT_PAGE_SIZE}


class OpenAPI:
    def __init__(self, document):
        self._body = json.dumps(document).encode()

    def on_get(self, req, resp):
        resp.content_type = JSON
        resp.data = self._body


class Index:
    """Where a newcomer starts: links to the documentation."""

    def on_get(self, req, resp):
        resp.media = {'title': 'Person API', 'docs': '/docs', 'openapi': '/openapi.json'}


# Swagger UI's files, under a path that names their version: a new version is a new URL,
# so browsers may keep each file for good.
SWAGGER_UI = swagger_ui_bundle.swagger_ui_path
ASSETS_PATH = f'/docs/{SWAGGER_UI.name}'
ASSET_TYPES = {'swagger-ui-bundle.js': 'text/javascript; charset=utf-8',
               'swagger-ui.css': 'text/css; charset=utf-8', 'favicon-32x32.png': 'image/png'}
# No top bar (it would load any URL typed in it) and no validator badge (it calls a
# public validator with the document).
SWAGGER_UI_SCRIPT = ("window.ui = SwaggerUIBundle({url: '/openapi.json', dom_id: '#swagger-ui', "
                     "deepLinking: true, validatorUrl: null});")
DOCS_PAGE = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Person API</title>
<link rel="stylesheet" href="{ASSETS_PATH}/swagger-ui.css">
<link rel="icon" type="image/png" href="{ASSETS_PATH}/favicon-32x32.png">
</head>
<body>
<div id="swagger-ui"></div>
<script src="{ASSETS_PATH}/swagger-ui-bundle.js"></script>
<script>{SWAGGER_UI_SCRIPT}</script>
</body>
</html>
""".encode()
_script_hash = base64.b64encode(hashlib.sha256(SWAGGER_UI_SCRIPT.encode()).digest()).decode()
# The browser itself refuses anything from another host; Swagger UI styles with inline
# attributes and draws its icons from data: URLs.
DOCS_POLICY = (f"default-src 'self'; script-src 'self' 'sha256-{_script_hash}'; "
               "style-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'")


class DocsPage:
    """Swagger UI for /openapi.json."""

    def on_get(self, req, resp):
        resp.content_type = 'text/html; charset=utf-8'
        resp.cache_control = ['no-cache']  # revalidate: a new release may change the page
        resp.set_header('Content-Security-Policy', DOCS_POLICY)
        resp.data = DOCS_PAGE


class DocsAsset:
    """One of Swagger UI's files, read once per process."""

    def on_get(self, req, resp, name):
        if name not in ASSET_TYPES:
            raise falcon.HTTPNotFound(description=f'No file {name} here.')
        resp.content_type = ASSET_TYPES[name]
        resp.cache_control = ['public', 'max-age=31536000', 'immutable']
        resp.data = _asset(name)


@functools.cache
def _asset(name):
    return (SWAGGER_UI / name).read_bytes()


def _error(title, description, **more):
    return {'title': title, 'description': description, **more, 'request_id': EXAMPLE_REQUEST_ID}


# What the person routes answer, as examples: a 404 for the example's id once it is deleted,
# a 409 for a second Ada, a 422 for {"first_name": "", "email": "nope"}.
ERROR_EXAMPLES = {
    404: _error('404 Not Found', f'No person has the id {EXAMPLE_ID}.'),
    409: _error('E-mail already registered', 'email: another person already uses this address.'),
    422: _error('Invalid person', 'first_name: must be 1 to 100 characters long.', errors=[
        {'field': 'first_name', 'message': 'must be 1 to 100 characters long'},
        {'field': 'last_name', 'message': 'is required'},
        {'field': 'email', 'message': 'is not a valid address (An email address must have an '
                                      '@-sign.)'}]),
}


def _error_responses(*statuses):
    descriptions = {400: 'Malformed JSON', 404: 'No such person', 409: 'E-mail already used',
                    413: 'Body too large', 415: 'Not application/json',
                    422: 'Invalid fields: `errors` lists each', 429: 'Rate limit exceeded',
                    401: 'Missing or wrong bearer token', 503: 'Database unavailable',
                    412: 'If-Match names no current version of the person',
                    428: 'If-Match is required (REQUIRE_IF_MATCH)'}
    return {str(status): _error_response(descriptions[status], ERROR_EXAMPLES.get(status))
            for status in statuses}


def _error_response(description, example=None):
    content = {'schema': {'$ref': '#/components/schemas/Error'}}
    if example:
        content['example'] = example
    return {'description': description, 'content': {JSON: content}}


def _list_operation(email):
    """GET /person: its parameters' and page's examples are a real request and its answer,
    right after POST's example."""
    def parameter(name, description, schema, **example):
        return {'name': name, 'in': 'query', 'required': False, 'description': description,
                'schema': schema, **example}

    page = {'description': 'A page of persons, in id order', 'headers': {'Link': {
        'schema': {'type': 'string'},
        'description': '`<next>; rel="next"` (RFC 8288), when a page follows'}},
        'content': {JSON: {'schema': {'$ref': '#/components/schemas/PersonPage'},
                           'example': EXAMPLE_PAGE}}}
    return {
        'summary': 'List everyone page by page, or find a person by e-mail',
        'operationId': 'listPersons',
        'description': 'Everyone in id order, `limit` at a time: follow `next` until it is '
                       'null. A walk sees every person who exists for the whole of it once, '
                       'while others write. With `email`, the person with that address (in '
                       'any case) or no one. Any other parameter, or one given twice, is 400.',
        'parameters': [
            parameter('limit', 'Persons per page', {
                'type': 'integer', 'minimum': 1, 'maximum': MAX_PAGE_SIZE,
                'default': DEFAULT_PAGE_SIZE}, example=DEFAULT_PAGE_SIZE),
            parameter('cursor', 'Where the page starts: taken from the `next` of the page '
                      'before, never made by hand (the service refuses one it did not make)',
                      {'type': 'string', 'pattern': f'^{CURSOR}$'}),
            parameter('email', 'An exact address, in any case (not with `cursor`)', email,
                      example=ADA['email'])],
        'responses': {'200': page,
                      '400': _error_response('Invalid query parameter (the description '
                                             'names it)'),
                      '414': _error_response('Request line too long: refused by the server '
                                             'before the app'),
                      **_error_responses(401, 503)}}


def _person_page():
    return {'type': 'object', 'additionalProperties': False,
            'required': ['items', 'next', 'limit'],
            'properties': {
                'items': {'type': 'array', 'maxItems': MAX_PAGE_SIZE,
                          'items': {'$ref': '#/components/schemas/Person'}},
                'next': {'type': 'string', 'nullable': True,
                         'pattern': f'^/person\\?(limit=[0-9]+&)?cursor={CURSOR}$',
                         'description': 'The path of the next page; null on the last'},
                'limit': {'type': 'integer', 'minimum': 1, 'maximum': MAX_PAGE_SIZE}},
            'example': EXAMPLE_PAGE}


def openapi_document():
    name = {'$ref': '#/components/schemas/Name'}
    email = {'type': 'string', 'format': 'email', 'maxLength': MAX_EMAIL_LENGTH}
    person_input = {'type': 'object', 'additionalProperties': False,
                    'properties': {'first_name': name, 'last_name': name, 'email': email}}
    person_id = {'type': 'integer', 'minimum': 1, 'maximum': MAX_PERSON_ID, 'example': EXAMPLE_ID}

    def body(ref, *types):
        return {'required': True, 'content': {t: {'schema': {'$ref': ref}} for t in types}}

    def ok(description, ref=None, example=None, **extra):
        response = {'description': description, **extra}
        if ref:
            response['content'] = {JSON: {'schema': {'$ref': ref}}}
        if example:
            response['content'][JSON]['example'] = example
        return response

    def header(name, description, **schema):
        return {'name': name, 'in': 'header', 'required': False, 'description': description,
                'schema': {'type': 'string', **schema}}

    etag = {'ETag': {'schema': {'type': 'string'},
                     'description': 'Strong entity tag of the person\'s current version'}}
    if_match = header('If-Match', 'Write only if the person is at one of these ETags (or `*`); '
                      'else 412. Required (428) when REQUIRE_IF_MATCH is set.')
    writes = (400, 401, 413, 415, 422, 429, 503)
    conditional = (404, 409, 412, 428, *writes)
    item = {
        'parameters': [{'name': 'person_id', 'in': 'path', 'required': True,
                        'schema': person_id}],
        'get': {'summary': 'Read a person\'s e-mail', 'operationId': 'getPerson',
                'parameters': [header('If-None-Match', '304 when the person is at one of '
                                      'these ETags (or `*`)')],
                'responses': {'200': ok('The person', '#/components/schemas/PersonEmail',
                                        {'id': EXAMPLE_ID, 'email': ADA['email']}, headers=etag),
                              '304': ok('Not modified since the ETag given', headers=etag),
                              **_error_responses(401, 404, 503)}},
        'put': {'summary': 'Replace a person', 'operationId': 'replacePerson',
                'description': 'The body may also repeat the path\'s id as "id".',
                'parameters': [if_match],
                'requestBody': body('#/components/schemas/PersonReplace', JSON),
                'responses': {'200': ok('The person as stored', '#/components/schemas/Person',
                                        {'id': EXAMPLE_ID, **EXAMPLE_REPLACEMENT}, headers=etag),
                              **_error_responses(*conditional)}},
        'patch': {'summary': 'Change some fields (JSON merge patch)', 'operationId': 'patchPerson',
                  'parameters': [if_match],
                  'requestBody': body('#/components/schemas/PersonPatch', JSON, MERGE_PATCH),
                  'responses': {'200': ok('The person as stored', '#/components/schemas/Person',
                                          {'id': EXAMPLE_ID, **ADA, **EXAMPLE_PATCH},
                                          headers=etag),
                                **_error_responses(*conditional)}},
        'delete': {'summary': 'Delete a person', 'operationId': 'deletePerson',
                   'parameters': [if_match],
                   'responses': {'204': ok('Deleted'),
                                 **_error_responses(401, 404, 412, 428, 429, 503)}},
    }
    collection = {'post': {
        'summary': 'Register a person and send the welcome mail', 'operationId': 'createPerson',
        'parameters': [header(
            'Idempotency-Key', 'Makes a retry safe: a repeat with the same key and body within '
            'IDEMPOTENCY_TTL gets the first 201 again, and creates nothing; with another body, '
            '422.', minLength=1, maxLength=MAX_IDEMPOTENCY_KEY, pattern='^[!-~]+$')],
        'requestBody': body('#/components/schemas/PersonCreate', JSON),
        'responses': {'201': ok('Created, or the replay of a request with the same '
                                'Idempotency-Key', '#/components/schemas/Person',
                                {'id': EXAMPLE_ID, **ADA}, headers={
            'Location': {'schema': {'type': 'string'}, 'description': '/person/{id}'}, **etag,
            'Idempotent-Replayed': {'schema': {'type': 'string', 'enum': ['true']},
                                    'description': 'Present on a replay'}}),
            **_error_responses(409, *writes)}}}
    collection['get'] = _list_operation(email)
    problems = {'type': 'array', 'items': {'$ref': '#/components/schemas/Problem'},
                'description': "A 422's problems, all of them: the body's `id` first, then "
                               'first_name, last_name and email, then the fields the schema '
                               "does not know, in the body's order. The description repeats "
                               'the first.'}
    status = {'type': 'object', 'required': ['status'],
              'properties': {'status': {'type': 'string'}}}
    return {
        'openapi': '3.0.3',
        'info': {'title': 'Person API', 'version': '1.0.0'},
        'paths': {
            '/': {'get': {'summary': 'Links to this document and to /docs', 'operationId': 'index',
                          'responses': {'200': ok('Links', '#/components/schemas/Index')}}},
            '/person': collection,
            '/person/{person_id}': item,
            '/healthz': {'get': {'summary': 'The process is up', 'operationId': 'health',
                                 'responses': {'200': ok('Up', '#/components/schemas/Status')}}},
            '/readyz': {'get': {'summary': 'Writes to the database work', 'operationId': 'ready',
                                'responses': {'200': ok('Ready', '#/components/schemas/Status'),
                                              **_error_responses(503)}}},
            '/openapi.json': {'get': {'summary': 'This document', 'operationId': 'openapi',
                                      'responses': {'200': ok('OpenAPI 3 document')}}},
            '/metrics': {'get': {
                'summary': 'Prometheus metrics (absent with METRICS=off)', 'operationId': 'metrics',
                'responses': {'200': {'description': 'Counts and timings; no personal data',
                                      'content': {'text/plain': {'schema': {'type': 'string'}}}}}}},
        },
        'components': {
            'securitySchemes': {'bearer': {'type': 'http', 'scheme': 'bearer'}},
            'schemas': {
                'Name': {'type': 'string', 'minLength': 1, 'maxLength': MAX_NAME_LENGTH,
                         'pattern': names.pattern(),
                         'description': 'Trimmed; at least one letter, digit, punctuation mark '
                                        'or symbol; no control characters, no bidirectional '
                                        'embeddings, overrides or isolates.'},
                'PersonCreate': {**person_input, 'required': list(PERSON_FIELDS),
                                 'example': ADA},
                'PersonReplace': {**person_input, 'required': list(PERSON_FIELDS),
                                  'example': EXAMPLE_REPLACEMENT},
                'PersonPatch': {**person_input, 'example': EXAMPLE_PATCH},
                'Person': {'type': 'object', 'additionalProperties': False,
                           'required': ['id', *PERSON_FIELDS], 'example': {'id': EXAMPLE_ID, **ADA},
                           'properties': {'id': person_id, 'first_name': name,
                                          'last_name': name, 'email': email}},
                'PersonEmail': {'type': 'object', 'additionalProperties': False,
                                'required': ['id', 'email'],
                                'properties': {'id': person_id, 'email': email}},
                'PersonPage': _person_page(),
                'Status': status,
                'Index': {'type': 'object', 'required': ['title', 'docs', 'openapi'],
                          'properties': {key: {'type': 'string'}
                                         for key in ('title', 'docs', 'openapi')}},
                'Error': {'type': 'object', 'required': ['title'],
                          'properties': {'title': {'type': 'string'},
                                         'description': {'type': 'string'},
                                         'errors': problems,
                                         'request_id': {'type': 'string'}}},
                'Problem': {'type': 'object', 'required': ['field', 'message'],
                            'properties': {
                                'field': {'type': 'string', 'nullable': True,
                                          'description': 'null when the body as a whole is wrong'},
                                'message': {'type': 'string'}}},
            },
        },
    }

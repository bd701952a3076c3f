"""The API's description: the OpenAPI 3 document served at /openapi.json, built from the
same limits the validation enforces.
"""

import json

from models import MAX_EMAIL_LENGTH, MAX_NAME_LENGTH

JSON = 'application/json'
MERGE_PATCH = 'application/merge-patch+json'
PERSON_FIELDS = ('first_name', 'last_name', 'email')


class OpenAPI:
    def __init__(self, document):
        self._body = json.dumps(document).encode()

    def on_get(self, req, resp):
        resp.content_type = JSON
        resp.data = self._body


def _error_responses(*statuses):
    descriptions = {400: 'Malformed JSON', 404: 'No such person', 409: 'E-mail already used',
                    413: 'Body too large', 415: 'Not application/json',
                    422: 'Invalid field (the description names it)', 429: 'Rate limit exceeded',
                    401: 'Missing or wrong bearer token', 503: 'Database unavailable',
                    412: 'If-Match names no current version of the person',
                    428: 'If-Match is required (REQUIRE_IF_MATCH)'}
    return {str(status): {'description': descriptions[status],
                          'content': {JSON: {'schema': {'$ref': '#/components/schemas/Error'}}}}
            for status in statuses}


def openapi_document():
    allowed = r'[^\u0000-\u001f\u007f-\u009f\u2028\u2029]'
    name = {'type': 'string', 'minLength': 1, 'maxLength': MAX_NAME_LENGTH,
            'pattern': f'^{allowed}*[^\\s\\u0000-\\u001f\\u007f-\\u009f\\u2028\\u2029]{allowed}*$',
            'description': 'Trimmed; no control characters.'}
    email = {'type': 'string', 'format': 'email', 'maxLength': MAX_EMAIL_LENGTH}
    person_input = {'type': 'object', 'additionalProperties': False,
                    'properties': {'first_name': name, 'last_name': name, 'email': email}}
    person_id = {'type': 'integer', 'minimum': 1}

    def body(ref, *types):
        return {'required': True, 'content': {t: {'schema': {'$ref': ref}} for t in types}}

    def ok(description, ref=None, **extra):
        response = {'description': description, **extra}
        if ref:
            response['content'] = {JSON: {'schema': {'$ref': ref}}}
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
                                        headers=etag),
                              '304': ok('Not modified since the ETag given', headers=etag),
                              **_error_responses(401, 404, 503)}},
        'put': {'summary': 'Replace a person', 'operationId': 'replacePerson',
                'description': 'The body may also repeat the path\'s id as "id".',
                'parameters': [if_match],
                'requestBody': body('#/components/schemas/PersonReplace', JSON),
                'responses': {'200': ok('The person as stored', '#/components/schemas/Person',
                                        headers=etag),
                              **_error_responses(*conditional)}},
        'patch': {'summary': 'Change some fields (JSON merge patch)', 'operationId': 'patchPerson',
                  'parameters': [if_match],
                  'requestBody': body('#/components/schemas/PersonPatch', JSON, MERGE_PATCH),
                  'responses': {'200': ok('The person as stored', '#/components/schemas/Person',
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
            '422.', minLength=1, maxLength=255, pattern='^[!-~]+$')],
        'requestBody': body('#/components/schemas/PersonCreate', JSON),
        'responses': {'201': ok('Created, or the replay of a request with the same '
                                'Idempotency-Key', '#/components/schemas/Person', headers={
            'Location': {'schema': {'type': 'string'}, 'description': '/person/{id}'}, **etag,
            'Idempotent-Replayed': {'schema': {'type': 'string', 'enum': ['true']},
                                    'description': 'Present on a replay'}}),
            **_error_responses(409, *writes)}}}
    status = {'type': 'object', 'required': ['status'],
              'properties': {'status': {'type': 'string'}}}
    return {
        'openapi': '3.0.3',
        'info': {'title': 'Person API', 'version': '1.0.0'},
        'paths': {
            '/person': collection,
            '/person/{person_id}': item,
            '/healthz': {'get': {'summary': 'The process is up', 'operationId': 'health',
                                 'responses': {'200': ok('Up', '#/components/schemas/Status')}}},
            '/readyz': {'get': {'summary': 'The database answers', 'operationId': 'ready',
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
                'PersonCreate': {**person_input,
                                 'required': list(PERSON_FIELDS)},
                'PersonReplace': {**person_input, 'required': list(PERSON_FIELDS)},
                'PersonPatch': person_input,
                'Person': {'type': 'object', 'additionalProperties': False,
                           'required': ['id', *PERSON_FIELDS],
                           'properties': {'id': person_id, 'first_name': name,
                                          'last_name': name, 'email': email}},
                'PersonEmail': {'type': 'object', 'additionalProperties': False,
                                'required': ['id', 'email'],
                                'properties': {'id': person_id, 'email': email}},
                'Status': status,
                'Error': {'type': 'object', 'required': ['title'],
                          'properties': {'title': {'type': 'string'},
                                         'description': {'type': 'string'},
                                         'request_id': {'type': 'string'}}},
            },
        },
    }

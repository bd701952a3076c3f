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
                    401: 'Missing or wrong bearer token', 503: 'Database unavailable'}
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

    writes = (400, 401, 413, 415, 422, 429, 503)
    item = {
        'parameters': [{'name': 'person_id', 'in': 'path', 'required': True,
                        'schema': person_id}],
        'get': {'summary': 'Read a person\'s e-mail', 'operationId': 'getPerson',
                'responses': {'200': ok('The person', '#/components/schemas/PersonEmail'),
                              **_error_responses(401, 404, 503)}},
        'put': {'summary': 'Replace a person', 'operationId': 'replacePerson',
                'description': 'The body may also repeat the path\'s id as "id".',
                'requestBody': body('#/components/schemas/PersonReplace', JSON),
                'responses': {'200': ok('The person as stored', '#/components/schemas/Person'),
                              **_error_responses(404, 409, *writes)}},
        'patch': {'summary': 'Change some fields (JSON merge patch)', 'operationId': 'patchPerson',
                  'requestBody': body('#/components/schemas/PersonPatch', JSON, MERGE_PATCH),
                  'responses': {'200': ok('The person as stored', '#/components/schemas/Person'),
                                **_error_responses(404, 409, *writes)}},
        'delete': {'summary': 'Delete a person', 'operationId': 'deletePerson',
                   'responses': {'204': ok('Deleted'), **_error_responses(401, 404, 429, 503)}},
    }
    collection = {'post': {
        'summary': 'Register a person and send the welcome mail', 'operationId': 'createPerson',
        'requestBody': body('#/components/schemas/PersonCreate', JSON),
        'responses': {'201': ok('Created', '#/components/schemas/Person', headers={
            'Location': {'schema': {'type': 'string'}, 'description': '/person/{id}'}}),
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

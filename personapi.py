"""The Person API: a Falcon WSGI app that registers people and queues their welcome mail.

`create_app(config, courier)` builds the app from its collaborators (for tests);
the module-level `app`, for `gunicorn personapi:app`, builds them from the environment.
"""

import hmac
import ipaddress
import itertools
import json
import logging
import math
import os
import re
import time
import uuid

import email_validator
import falcon
import limits
import limits.storage
import limits.strategies
import peewee

import mailer
import models
from config import Config
from models import Person, db

log = logging.getLogger('personapi')

MAX_BODY_BYTES = 64 * 1024
MAX_NAME_LENGTH = 100
MAX_EMAIL_LENGTH = 254
NAME_FIELDS = ('first_name', 'last_name')
PERSON_FIELDS = NAME_FIELDS + ('email',)
JSON = 'application/json'
MERGE_PATCH = 'application/merge-patch+json'
REQUEST_ID = re.compile(r'[A-Za-z0-9._:-]{1,128}\Z')
WRITE_METHODS = frozenset({'POST', 'PUT', 'PATCH', 'DELETE'})
BODY_METHODS = frozenset({'POST', 'PUT', 'PATCH'})
OPEN_PATHS = frozenset({'/healthz', '/readyz', '/openapi.json'})  # never behind the token
# Ids the routes accept: anything else (negative, huge, not a number) is simply not found.
PERSON_ROUTE = '/person/{person_id:int(min=1, max=9223372036854775807)}'


# --- Request bodies -------------------------------------------------------------------------

def _reject_duplicate_keys(pairs):
    keys = [key for key, _ in pairs]
    if len(keys) != len(set(keys)):
        raise ValueError('duplicate object key')
    return dict(pairs)


def _reject_constant(name):
    raise ValueError(f'{name} is not valid JSON')


def read_json(req, media_types=(JSON,)):
    """The request's JSON body: strict (RFC 8259, unique keys) and at most MAX_BODY_BYTES."""
    media_type, params = falcon.parse_header(req.content_type or '')
    charset = params.get('charset', 'utf-8').lower()
    if media_type.lower() not in media_types or charset not in ('utf-8', 'utf8'):
        raise falcon.HTTPUnsupportedMediaType(
            description=f'Send the body as {" or ".join(media_types)} (UTF-8).')
    if (req.content_length or 0) > MAX_BODY_BYTES:
        raise _too_large()
    raw = _read_body(req)
    if len(raw) > MAX_BODY_BYTES:
        raise _too_large()
    try:
        return json.loads(raw.decode('utf-8'), object_pairs_hook=_reject_duplicate_keys,
                          parse_constant=_reject_constant)
    except (ValueError, RecursionError) as error:
        raise falcon.HTTPBadRequest(title='Malformed JSON',
                                    description=f'The body is not valid JSON: {error}.')


def _read_body(req):
    """At most MAX_BODY_BYTES + 1 bytes of the body."""
    # A server that marks the end of the input (gunicorn does) lets a chunked body be read;
    # elsewhere only Content-Length bytes are safe to read.
    stream = req.stream if req.env.get('wsgi.input_terminated') else req.bounded_stream
    try:
        return stream.read(MAX_BODY_BYTES + 1)
    except TimeoutError:  # see BodyTimeout
        raise falcon.HTTPError(falcon.HTTP_408, description='The body did not arrive in time.')


def _too_large():
    return falcon.HTTPContentTooLarge(
        description=f'The body must not exceed {MAX_BODY_BYTES} bytes.')


# --- Validation -----------------------------------------------------------------------------

def _invalid(field, problem):
    return falcon.HTTPUnprocessableEntity(title='Invalid person', description=f'{field}: {problem}.')


def clean_name(field, value):
    if not isinstance(value, str):
        raise _invalid(field, 'must be a string')
    if mailer.has_control_characters(value):
        raise _invalid(field, 'must not contain control characters')
    value = value.strip()
    if not 1 <= len(value) <= MAX_NAME_LENGTH:
        raise _invalid(field, f'must be 1 to {MAX_NAME_LENGTH} characters long')
    return value


def clean_email(value):
    """The address with its domain lower-cased, as email-validator normalises it."""
    if not isinstance(value, str):
        raise _invalid('email', 'must be a string')
    if len(value) > MAX_EMAIL_LENGTH:
        raise _invalid('email', f'must be at most {MAX_EMAIL_LENGTH} characters long')
    try:
        return email_validator.validate_email(value, check_deliverability=False).normalized
    except email_validator.EmailNotValidError as error:
        raise _invalid('email', f'is not a valid address ({error})')


CLEANERS = {'first_name': lambda value: clean_name('first_name', value),
            'last_name': lambda value: clean_name('last_name', value),
            'email': clean_email}


def clean_person(body, *, person_id=None, partial=False):
    """The model fields a request body sets; raises 422 naming the first bad field.

    `person_id` is the path's id, which the body may repeat; `partial` allows any subset
    of the fields (a merge patch), but never a null one, since every field is required.
    """
    if not isinstance(body, dict):
        raise falcon.HTTPUnprocessableEntity(title='Invalid person',
                                             description='The body must be a JSON object.')
    for field in body:
        if field not in PERSON_FIELDS and not (field == 'id' and person_id is not None):
            raise _invalid(field, 'is not a known field')
    if 'id' in body and not (type(body['id']) is int and body['id'] == person_id):
        raise _invalid('id', "must equal the id in the path")
    fields = {}
    for field in PERSON_FIELDS:
        if field not in body:
            if not partial:
                raise _invalid(field, 'is required')
        elif body[field] is None:
            raise _invalid(field, 'is required and cannot be null')
        else:
            fields[field] = CLEANERS[field](body[field])
    if 'email' in fields:
        fields['email_key'] = models.email_key(fields['email'])
    return fields


def person_document(person):
    return {'id': person.id, 'first_name': person.first_name,
            'last_name': person.last_name, 'email': person.email}


def _conflict():
    return falcon.HTTPConflict(title='E-mail already registered',
                               description='email: another person already uses this address.')


def _not_found(person_id):
    return falcon.HTTPNotFound(description=f'No person has the id {person_id}.')


# --- Resources ------------------------------------------------------------------------------

class PersonCollection:
    def __init__(self, courier):
        self._courier = courier

    def on_post(self, req, resp):
        fields = clean_person(read_json(req))
        try:
            with models.write_transaction():
                person_id = models.insert(Person, **fields)
                mailer.enqueue_welcome(fields)
        except peewee.IntegrityError:
            raise _conflict()
        self._courier.wake()
        resp.status = falcon.HTTP_201
        resp.location = f'/person/{person_id}'
        resp.media = person_document(Person(id=person_id, **fields))


class PersonItem:
    def on_get(self, req, resp, person_id):
        row = models.find_email(person_id)
        if row is None:
            raise _not_found(person_id)
        resp.media = {'id': row[0], 'email': row[1]}

    def on_put(self, req, resp, person_id):
        resp.media = self._update(person_id, clean_person(read_json(req), person_id=person_id))

    def on_patch(self, req, resp, person_id):
        patch = read_json(req, media_types=(JSON, MERGE_PATCH))
        resp.media = self._update(person_id, clean_person(patch, person_id=person_id,
                                                          partial=True))

    def on_delete(self, req, resp, person_id):
        with models.write_transaction():
            deleted = Person.delete().where(Person.id == person_id).execute()
        if not deleted:
            raise _not_found(person_id)
        resp.status = falcon.HTTP_204

    @staticmethod
    def _update(person_id, fields):
        try:
            with models.write_transaction():
                person = Person.get_or_none(Person.id == person_id)
                if person is None:
                    raise _not_found(person_id)
                for field, value in fields.items():
                    setattr(person, field, value)
                if fields:
                    person.save()
        except peewee.IntegrityError:
            raise _conflict()
        return person_document(person)


class Health:
    def on_get(self, req, resp):
        resp.media = {'status': 'ok'}


class Readiness:
    def on_get(self, req, resp):
        db.execute_sql('SELECT 1')  # a failure is the database handler's 503
        resp.media = {'status': 'ready'}


class OpenAPI:
    def __init__(self, document):
        self._body = json.dumps(document).encode()

    def on_get(self, req, resp):
        resp.content_type = JSON
        resp.data = self._body


# --- Cross-cutting --------------------------------------------------------------------------

class RequestId:
    """Accept a well-formed X-Request-ID or make one, and return it; logs quote it.

    A made id is a random prefix, new in each process, and a counter: unique without the
    cost of a uuid4 per request.
    """

    def __init__(self):
        self._generator = (None, None, None)  # (pid, prefix, counter), replaced as one

    def process_request(self, req, resp):
        given = req.get_header('X-Request-ID')
        req.context.request_id = given if given and REQUEST_ID.match(given) else self._make()

    def _make(self):
        pid, prefix, counter = self._generator
        if pid != os.getpid():  # a forked worker must not repeat its parent's ids
            pid, prefix, counter = os.getpid(), uuid.uuid4().hex[:12], itertools.count(1)
            self._generator = (pid, prefix, counter)
        return f'{prefix}-{next(counter)}'

    def process_response(self, req, resp, resource, req_succeeded):
        resp.set_header('X-Request-ID', req.context.request_id)


class SecurityHeaders:
    """Responses are never sniffed as another type, and never cached: they hold personal data."""

    def process_response(self, req, resp, resource, req_succeeded):
        resp.set_header('X-Content-Type-Options', 'nosniff')
        resp.set_header('Cache-Control', 'no-store')


class BodyTimeout:
    """Cut off a client that stalls while sending a body: gunicorn's threads would wait forever."""

    def __init__(self, seconds):
        self._seconds = seconds

    def process_request(self, req, resp):
        self._set(req, self._seconds)

    def process_response(self, req, resp, resource, req_succeeded):
        self._set(req, None)

    @staticmethod
    def _set(req, seconds):
        client = req.env.get('gunicorn.socket')
        if client is not None and req.method in BODY_METHODS:
            client.settimeout(seconds)


class BearerToken:
    """With API_TOKEN set, every route but the open ones needs `Authorization: Bearer <token>`.

    Checked before routing, so an unknown id without the token is 401, not 404.
    """

    def __init__(self, token):
        self._token = token.encode()

    def process_request(self, req, resp):
        if req.path in OPEN_PATHS:
            return
        scheme, _, given = (req.get_header('Authorization') or '').partition(' ')
        if scheme.lower() != 'bearer' or not hmac.compare_digest(given.strip().encode(),
                                                                  self._token):
            raise falcon.HTTPUnauthorized(title='Unauthorized',
                                          description='Send Authorization: Bearer <token>.',
                                          challenges=['Bearer'])


def parse_networks(spec):
    """gunicorn's forwarded_allow_ips syntax: comma-separated addresses or networks, or '*'."""
    items = [item.strip() for item in spec.split(',') if item.strip()]
    return [ipaddress.ip_network(item, strict=False) for item in items if item != '*'] + (
        [ipaddress.ip_network('0.0.0.0/0'), ipaddress.ip_network('::/0')] if '*' in items else [])


def client_address(req, trusted_proxies):
    """The socket peer, or, when the peer is a trusted proxy, the nearest address in
    X-Forwarded-For that is not one: a header from anyone else changes nothing."""
    hops = [req.remote_addr] + [hop.strip() for hop in reversed(
        (req.get_header('X-Forwarded-For') or '').split(','))]
    for hop in hops:
        try:
            address = ipaddress.ip_address(hop)
        except ValueError:
            return hop  # not an address: the last trustworthy word about the client
        if not any(address in network for network in trusted_proxies):
            return hop
    return hops[-1]


class RateLimit:
    """Writes per client address, counted by the `limits` library: 429 past the budget.

    In-memory storage counts per worker process; a redis:// storage shares one budget
    between every worker and replica.
    """

    def __init__(self, limit, storage_uri, trusted_proxies=()):
        self._limit = limits.parse(limit)
        self._limiter = limits.strategies.MovingWindowRateLimiter(
            limits.storage.storage_from_string(storage_uri))
        self._trusted_proxies = trusted_proxies

    def process_request(self, req, resp):
        if req.method not in WRITE_METHODS:
            return
        client = client_address(req, self._trusted_proxies)
        try:
            allowed = self._limiter.hit(self._limit, 'writes', client)
        except Exception:  # storage unreachable: serve rather than refuse everyone
            log.warning('rate limit storage unavailable (request %s)', req.context.request_id)
            return
        if not allowed:
            reset_at = self._limiter.get_window_stats(self._limit, 'writes', client).reset_time
            raise falcon.HTTPTooManyRequests(
                description=f'At most {self._limit} writes per client; try again later.',
                retry_after=max(1, math.ceil(reset_at - time.time())))


def rate_limiting_enabled(limit):
    return limit.strip().lower() not in ('', '0', 'off')


class ConnectionPerRequest:
    """Give a database server's connection back after each request (to its pool, if any).

    SQLite keeps one connection per worker thread instead: opening one costs more than
    the query it would serve.
    """

    def process_response(self, req, resp, resource, req_succeeded):
        if not db.is_closed():
            db.close()


def serialize_error(req, resp, exception):
    body = exception.to_dict()
    request_id = getattr(req.context, 'request_id', None)
    if request_id:
        body['request_id'] = request_id
    resp.content_type = JSON
    resp.data = json.dumps(body).encode()


def handle_database_down(req, resp, error, params):
    log.warning('database unavailable: %s (request %s)', type(error).__name__,
                req.context.request_id)
    raise falcon.HTTPServiceUnavailable(title='Database unavailable',
                                        description='Try again shortly.', retry_after=5)


def handle_unexpected(req, resp, error, params):
    log.exception('unexpected error (request %s)', req.context.request_id)
    raise falcon.HTTPInternalServerError(
        description=f'Something went wrong; quote request id {req.context.request_id}.')


# --- Assembly -------------------------------------------------------------------------------

def create_app(config, courier):
    """The WSGI app; `courier` delivers the welcome mails that POST queues."""
    middleware = [RequestId(), SecurityHeaders(), BodyTimeout(config.body_timeout)]
    if rate_limiting_enabled(config.rate_limit):
        middleware.append(RateLimit(config.rate_limit, config.rate_limit_storage,
                                    parse_networks(config.forwarded_allow_ips)))
    if config.api_token:
        middleware.append(BearerToken(config.api_token))
    if not models.is_sqlite():
        middleware.append(ConnectionPerRequest())
    app = falcon.App(middleware=middleware)
    app.req_options.strip_url_path_trailing_slash = True
    app.set_error_serializer(serialize_error)
    app.add_error_handler(Exception, handle_unexpected)
    app.add_error_handler((peewee.OperationalError, peewee.InterfaceError), handle_database_down)
    app.add_route('/person', PersonCollection(courier))
    app.add_route(PERSON_ROUTE, PersonItem())
    app.add_route('/healthz', Health())
    app.add_route('/readyz', Readiness())
    app.add_route('/openapi.json', OpenAPI(openapi_document()))
    return app


# --- OpenAPI --------------------------------------------------------------------------------

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


def __getattr__(name):
    # `app` and its `courier` are built from the environment on first use, not at import:
    # tests import this module without touching the default database, and gunicorn's
    # getattr builds them as usual.
    if name not in ('app', 'courier'):
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    config = Config.from_env()
    models.connect(config.database_url)
    courier = mailer.Courier.from_config(config)
    globals().update(courier=courier, app=create_app(config, courier))
    return globals()[name]

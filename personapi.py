"""The Person API: a Falcon WSGI app that registers people and queues their welcome mail.

This module holds the resources and what they need alone (request bodies, validation);
the HTTP edge's middleware is in `edge.py`, the OpenAPI document in `docs.py`.

`create_app(config, courier)` builds the app from its collaborators (for tests);
the module-level `app`, for `gunicorn personapi:app`, builds them from the environment.
"""

import json

import email_validator
import falcon
import peewee

import mailer
import models
from docs import JSON, MERGE_PATCH, PERSON_FIELDS, OpenAPI, openapi_document
from config import Config, parse_networks, rate_limiting_enabled
from edge import (BearerToken, BodyTimeout, ConnectionPerRequest, RateLimit, RequestId,
                  SecurityHeaders, handle_database_down, handle_unexpected, serialize_error)
from models import MAX_EMAIL_LENGTH, MAX_NAME_LENGTH, Person, db

MAX_BODY_BYTES = 64 * 1024
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
    except Exception:  # the server's own errors: a malformed chunk, a body cut short
        raise falcon.HTTPBadRequest(title='Malformed body',
                                    description='The body is not validly chunked, or ended early.')


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
    if mailer.looks_encoded(value):  # no mailbox needs it, and a mail client would decode it
        raise _invalid('email', 'must not contain "=?"')
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
                mailer.enqueue_welcome(person_id)
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
        models.erase_traces()
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

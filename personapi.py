"""The Person API: a Falcon WSGI app that registers people and queues their welcome mail.

This module holds the resources and what they need alone (request bodies, validation);
the HTTP edge's middleware is in `edge.py`, the OpenAPI document in `docs.py`.

`create_app(config, courier)` builds the app from its collaborators (for tests);
the module-level `app`, for `gunicorn personapi:app`, builds them from the environment.
"""

import base64
import hashlib
import hmac
import json
import re
import sqlite3
import time

import email_validator
import falcon
import peewee

import mailer
import metrics
import models
import names
import outbox
import ratelimit
from config import Config, parse_networks, rate_limiting_enabled
from docs import (ASSETS_PATH, CURSOR, DEFAULT_PAGE_SIZE, JSON, LIST_PARAMETERS,
                  MAX_IDEMPOTENCY_KEY, MAX_PAGE_SIZE, MAX_PERSON_ID, MERGE_PATCH, PERSON_FIELDS,
                  DocsAsset, DocsPage, Index, OpenAPI, openapi_document)
from edge import (BearerToken, ConnectionPerRequest, RateLimit, RequestId, SecurityHeaders,
                  database_unavailable, handle_database_error, handle_unexpected,
                  serialize_error)
from models import MAX_EMAIL_LENGTH, MAX_NAME_LENGTH, IdempotencyKey, Person

MAX_BODY_BYTES = 64 * 1024
PERSON_ROUTE = '/person/{person_id:person_id}'
# What resp.media writes, as Falcon's JSON handler does, but with the encoder made once:
# json.dumps() makes a new one for every call given options.
encode_json = json.JSONEncoder(ensure_ascii=False).encode
# What encode_json writes for a string, without its dispatch on the type.
encode_string = json.encoder.encode_basestring
# A body as the Idempotency-Key fingerprint reads it: keys sorted, ASCII (\ud800 too).
encode_canonical_json = json.JSONEncoder(sort_keys=True, separators=(',', ':')).encode


# --- Routing --------------------------------------------------------------------------------

class PersonId(falcon.routing.BaseConverter):
    """A person's id, written only one way: `[1-9][0-9]*` up to MAX_PERSON_ID; any other
    form is simply not found. Falcon's int converter uses int(), which also reads `01`,
    `+1`, `1_0`, ` 1` and digits of other scripts (`１`, `١`) as numbers."""

    CANONICAL = re.compile(r'[1-9][0-9]{0,18}\Z')  # [0-9], not \d: ASCII digits only

    def convert(self, value):
        if self.CANONICAL.match(value) and int(value) <= MAX_PERSON_ID:
            return int(value)
        return None


class Router(falcon.routing.CompiledRouter):
    """Falcon's router, but HEAD answers wherever GET does: the same responder runs and
    Falcon sends its status and headers without the body."""

    def __init__(self):
        super().__init__()
        self.options.converters['person_id'] = PersonId

    def map_http_methods(self, resource, **kwargs):
        methods = super().map_http_methods(resource, **kwargs)
        if 'GET' in methods:
            methods.setdefault('HEAD', methods['GET'])
        return methods


# --- Request bodies -------------------------------------------------------------------------

def _reject_duplicate_keys(pairs):
    keys = [key for key, _ in pairs]
    if len(keys) != len(set(keys)):
        raise ValueError('duplicate object key')
    return dict(pairs)


def _reject_constant(name):
    raise ValueError(f'{name} is not valid JSON')


def read_json(req, timeout, media_types=(JSON,)):
    """The request's JSON body: strict (RFC 8259, unique keys) and at most MAX_BODY_BYTES,
    from a client that never stalls over `timeout` seconds while sending it."""
    media_type, params = falcon.parse_header(req.content_type or '')
    charset = params.get('charset', 'utf-8').lower()
    if media_type.lower() not in media_types or charset not in ('utf-8', 'utf8'):
        raise falcon.HTTPUnsupportedMediaType(
            description=f'Send the body as {" or ".join(media_types)} (UTF-8).')
    if (req.content_length or 0) > MAX_BODY_BYTES:
        raise _too_large()
    raw = _read_body(req, timeout)
    if len(raw) > MAX_BODY_BYTES:
        raise _too_large()
    try:
        return json.loads(raw.decode('utf-8'), object_pairs_hook=_reject_duplicate_keys,
                          parse_constant=_reject_constant)
    except (ValueError, RecursionError) as error:
        raise falcon.HTTPBadRequest(title='Malformed JSON',
                                    description=f'The body is not valid JSON: {error}.')


def _read_body(req, timeout):
    """At most MAX_BODY_BYTES + 1 bytes of the body."""
    # A server that marks the end of the input (gunicorn does) lets a chunked body be read;
    # elsewhere only Content-Length bytes are safe to read.
    stream = req.stream if req.env.get('wsgi.input_terminated') else req.bounded_stream
    # gunicorn's threads would wait forever on a client that stalls while sending a body.
    client = req.env.get('gunicorn.socket')
    if client is not None:
        client.settimeout(timeout)
    try:
        return stream.read(MAX_BODY_BYTES + 1)
    except TimeoutError:
        raise falcon.HTTPError(falcon.HTTP_408, description='The body did not arrive in time.')
    except Exception:  # the server's own errors: a malformed chunk, a body cut short
        raise falcon.HTTPBadRequest(title='Malformed body',
                                    description='The body is not validly chunked, or ended early.')
    finally:
        if client is not None:
            client.settimeout(None)


def _too_large():
    return falcon.HTTPContentTooLarge(
        description=f'The body must not exceed {MAX_BODY_BYTES} bytes.')


# --- Validation -----------------------------------------------------------------------------

class UnprocessableFields(falcon.HTTPUnprocessableEntity):
    """422 listing every problem found, each as {"field": ..., "message": ...}; the
    description says the first, as `field: message.`"""

    def __init__(self, title, problems, description=None):
        field, message = problems[0]
        super().__init__(title=title, description=description or f'{field}: {message}.')
        self.problems = problems

    def to_dict(self, obj_type=dict):
        body = super().to_dict(obj_type)
        body['errors'] = [{'field': field, 'message': message} for field, message in self.problems]
        return body


def _invalid(field, problem):
    return UnprocessableFields('Invalid person', [(field, problem)])


def clean_name(field, value):
    if not isinstance(value, str):
        raise _invalid(field, 'must be a string')
    trimmed = value.strip()
    if not 1 <= len(trimmed) <= MAX_NAME_LENGTH:
        raise _invalid(field, f'must be 1 to {MAX_NAME_LENGTH} characters long')
    problem = names.problem(value)  # the untrimmed value: its ends may hold control characters
    if problem:
        raise _invalid(field, problem)
    return trimmed


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
    """The model fields a request body sets; raises 422 listing every bad field: `id`
    first, as in a person's document, then the schema's fields in its order, then the
    fields it does not know, in the body's order.

    `person_id` is the path's id, which the body may repeat; `partial` allows any subset
    of the fields (a merge patch), but never a null one, since every field is required.
    """
    if not isinstance(body, dict):
        raise UnprocessableFields('Invalid person', [(None, 'must be a JSON object')],
                                  description='The body must be a JSON object.')
    problems, fields = [], {}
    if 'id' in body and not (person_id is not None and type(body['id']) is int
                             and body['id'] == person_id):
        problems.append(('id', 'must equal the id in the path' if person_id is not None
                         else 'is not a known field'))
    for field in PERSON_FIELDS:
        if field not in body:
            if not partial:
                problems.append((field, 'is required'))
        elif body[field] is None:
            problems.append((field, 'is required and cannot be null'))
        else:
            try:
                fields[field] = CLEANERS[field](body[field])
            except UnprocessableFields as invalid:
                problems.extend(invalid.problems)
    problems.extend((field, 'is not a known field') for field in body
                    if field not in PERSON_FIELDS and field != 'id')
    if problems:
        raise UnprocessableFields('Invalid person', problems)
    if 'email' in fields:
        fields['email_key'] = models.email_key(fields['email'])
    return fields


def person_document(person):
    return {'id': person.id, 'first_name': person.first_name,
            'last_name': person.last_name, 'email': person.email}


def summary_json(person_id, email):
    """GET's document, the text encode_json makes of {"id": person_id, "email": email}, put
    together around the one string to escape: the encoder's set-up for a dict cost a tenth
    of the instructions of a GET."""
    return f'{{"id": {person_id:d}, "email": {encode_json(email)}}}'


def _conflict():
    return falcon.HTTPConflict(title='E-mail already registered',
                               description='email: another person already uses this address.')


def _not_found(person_id):
    """The 404 for an id no row has, once the database is known not to have lost it."""
    models.confirm_no_person(person_id)
    return falcon.HTTPNotFound(description=f'No person has the id {person_id}.')


def handle_route_not_found(req, resp, error, params):
    """Say why no route serves the path: a person's id written another way (the router's
    converter takes only the canonical form), or a path the API does not have."""
    if req.path.startswith('/person/') and '/' not in req.path[len('/person/'):]:
        raise falcon.HTTPNotFound(description=(
            f"A person's id is a whole number from 1 to {MAX_PERSON_ID}, written in decimal "
            'without sign, leading zeros or separators, such as /person/12.'))
    raise falcon.HTTPNotFound(description='No route serves this path; /openapi.json lists '
                                          'those there are.')


# --- Conditional requests (RFC 9110) and Idempotency-Key ------------------------------------

IDEMPOTENCY_KEY = re.compile(rf'[\x21-\x7e]{{1,{MAX_IDEMPOTENCY_KEY}}}\Z')  # visible ASCII
VERSION = re.compile(r'[0-9]{1,18}\Z')  # more digits could overflow a database integer


def entity_tag(person_id, version):
    """The opaque part of a person's strong ETag: the id too, so that one person's tag
    never matches another's."""
    return f'{person_id}-{version}'


def if_match_versions(req, person_id):
    """The person's versions that If-Match accepts; None for any (no header, or `*`).
    Compared strongly: a weak tag, or another person's, matches nothing."""
    tags = req.if_match
    if tags is None or tags == ['*']:
        return None
    prefix = f'{person_id}-'
    return [int(tag[len(prefix):]) for tag in tags
            if not tag.is_weak and tag.startswith(prefix) and VERSION.match(tag[len(prefix):])]


def if_none_match_hits(req, tag):
    """Whether If-None-Match names `tag` (compared weakly, as RFC 9110 asks) or is `*`."""
    tags = req.if_none_match
    return tags is not None and (tags == ['*'] or tag in tags)


def _unchanged_or_gone(person_id):
    """Why a conditional write matched no row: the person changed since the client's tag,
    or is gone."""
    if models.person_exists(person_id):
        return falcon.HTTPPreconditionFailed(
            description='If-Match: the person has changed; GET it again for its current ETag.')
    return _not_found(person_id)


def read_idempotency_key(req, body):
    """(digest of the Idempotency-Key, digest of the body), or None without the header."""
    key = req.get_header('Idempotency-Key')
    if key is None:
        return None
    if not IDEMPOTENCY_KEY.match(key):
        raise falcon.HTTPInvalidHeader(
            f'It must be 1 to {MAX_IDEMPOTENCY_KEY} visible ASCII characters.', 'Idempotency-Key')
    canonical = encode_canonical_json(body)
    return models.digest(key), models.digest(canonical)


def _created(resp, person_id, document):
    resp.status = falcon.HTTP_201
    resp.location = f'/person/{person_id}'
    resp.etag = entity_tag(person_id, Person.version.default)
    resp.content_type = JSON
    resp.text = document


# --- Listing: pages of everyone, and the lookup by address ----------------------------------

# The page sizes, by their canonical decimal: a lookup accepts these alone (not `05`, `+5`,
# `5.0` or `５`, which int() reads as numbers).
PAGE_SIZES = {str(size): size for size in range(1, MAX_PAGE_SIZE + 1)}


class Cursors:
    """A page's cursor: the last id of the page before it and a MAC of that id (keyed
    BLAKE2b, a third of HMAC-SHA256's cost), 24 bytes in base64url: only the service can
    make one. Its key is made once and kept in the database (models.service_key), not made
    by each process nor read from a setting: every worker and replica reads the others'
    cursors, a restart keeps them, and replicas cannot be set up to disagree. A cursor
    stays valid as long as the database: ids are never reused."""

    TEXT = re.compile(CURSOR + r'\Z')

    def __init__(self, key=None):
        self._key = key  # None: the database's, read at the first use (not at start)
        self._keyed = None  # BLAKE2b with the key taken in, copied for each MAC

    def make(self, last_id):
        id_bytes = last_id.to_bytes(8, 'big')
        return base64.urlsafe_b64encode(id_bytes + self._mac(id_bytes)).decode()

    def read(self, text):
        """The id `text` ends a page at, or None if the service did not make `text`."""
        if not self.TEXT.match(text):
            return None
        raw = base64.urlsafe_b64decode(text)
        if not hmac.compare_digest(raw[8:], self._mac(raw[:8])):
            return None
        return int.from_bytes(raw[:8], 'big')

    def _mac(self, id_bytes):
        if self._keyed is None:
            key = self._key or models.service_key(models.CURSOR_KEY)
            self._keyed = hashlib.blake2b(key=key, digest_size=16)
        mac = self._keyed.copy()
        mac.update(id_bytes)
        return mac.digest()


def _bad_parameter(name, problem):
    return falcon.HTTPBadRequest(title='Invalid query parameter',
                                 description=f'{name}: {problem}.')


def read_page_query(params, cursors):
    """(the id the page starts after, its size, the address to look up or None) from
    GET /person's query; raises 400 naming the first bad parameter."""
    for name, value in params.items():
        if name not in LIST_PARAMETERS:
            raise _bad_parameter(name or '(no name)', 'is not a parameter of GET /person, '
                                 'which takes limit, cursor and email')
        if not isinstance(value, str):
            raise _bad_parameter(name, 'must be given once')
    given_limit = params.get('limit')
    limit = DEFAULT_PAGE_SIZE if given_limit is None else PAGE_SIZES.get(given_limit)
    if limit is None:
        raise _bad_parameter('limit', f'must be a whole number from 1 to {MAX_PAGE_SIZE}')
    after, cursor, email = 0, params.get('cursor'), params.get('email')
    if cursor is not None:
        if email is not None:
            raise _bad_parameter('cursor', 'cannot be combined with email, whose answer is '
                                 'one page')
        after = cursors.read(cursor)
        if after is None:
            raise _bad_parameter('cursor', 'was not made by this service: send a page\'s '
                                 '"next" as it is')
    if email is not None:
        try:
            email = clean_email(email)
        except falcon.HTTPUnprocessableEntity as invalid:  # the problem, as POST words it
            raise falcon.HTTPBadRequest(title='Invalid query parameter',
                                        description=invalid.description)
    return after, limit, email


def page_json(rows, next_path, limit):
    """GET /person's document, the text encode_json makes of {"items": [person_document()
    of each row], "next": next_path, "limit": limit}, put together around the strings to
    escape (as summary_json is): the encoder's set-up for 20 dicts costs nearly three times
    as much. The ids are the database's integers, formatted without a spec (`:d` cost
    18,000 instructions a page)."""
    items = ', '.join([f'{{"id": {person_id}, "first_name": {encode_string(first_name)}, '
                       f'"last_name": {encode_string(last_name)}, "email": {encode_string(email)}}}'
                       for person_id, first_name, last_name, email in rows])
    next_json = 'null' if next_path is None else encode_string(next_path)
    return f'{{"items": [{items}], "next": {next_json}, "limit": {limit}}}'


# --- Resources ------------------------------------------------------------------------------

class PersonCollection:
    def __init__(self, courier, idempotency_ttl, body_timeout):
        self._courier = courier
        self._idempotency_ttl = idempotency_ttl
        self._body_timeout = body_timeout
        self._cursors = Cursors()

    def on_get(self, req, resp):
        """A page of everyone in id order, or the person with the address `email`."""
        after, limit, email = read_page_query(req.params, self._cursors)
        next_path = None
        if email is not None:
            rows = models.persons_with_email(email)
        else:
            rows = models.persons_after(after, limit + 1)  # one more tells if a page follows
            if len(rows) > limit:
                rows = rows[:limit]
                shown_limit = f'limit={limit}&' if 'limit' in req.params else ''
                next_path = f'/person?{shown_limit}cursor={self._cursors.make(rows[-1][0])}'
                resp.set_header('Link', f'<{next_path}>; rel="next"')
        resp.text = page_json(rows, next_path, limit)

    def on_post(self, req, resp):
        body = read_json(req, self._body_timeout)
        key = read_idempotency_key(req, body)
        if key:
            IdempotencyKey.purge(before=time.time() - self._idempotency_ttl)
            if self._replay(resp, *key):
                return
        fields = clean_person(body)
        try:
            person_id, document = self._create(fields, key)
        except peewee.IntegrityError:
            # The address is taken, perhaps by a request with the same key that just won.
            if key and self._replay(resp, *key):
                return
            raise _conflict()
        self._courier.wake()
        _created(resp, person_id, document)

    @staticmethod
    def _create(fields, key):
        """Insert the person, its welcome mail and the record of its key, as one."""
        def create():
            person_id = models.insert(Person, **fields)
            mailer.enqueue_welcome(person_id)
            document = encode_json(person_document(Person(id=person_id, **fields)))
            if key:
                key_hash, fingerprint = key
                models.insert(IdempotencyKey, key_hash=key_hash, fingerprint=fingerprint,
                              person=person_id, response=document, created_at=time.time())
            return person_id, document
        return models.write_together(create)

    def _replay(self, resp, key_hash, fingerprint):
        """Answer again what the first request with this key was answered, if there was one."""
        record = IdempotencyKey.find(key_hash, not_before=time.time() - self._idempotency_ttl)
        if record is None:
            return False
        if record.fingerprint != fingerprint:
            raise UnprocessableFields('Idempotency-Key reused', [(
                'Idempotency-Key', 'this key came with another body; send a new key for a new '
                                   'request')])
        _created(resp, record.person_id, record.response)
        resp.set_header('Idempotent-Replayed', 'true')
        return True


class PersonItem:
    def __init__(self, require_if_match, body_timeout):
        self._require_if_match = require_if_match
        self._body_timeout = body_timeout

    def on_get(self, req, resp, person_id):
        row = models.find_email_and_version(person_id)
        if row is None:
            raise _not_found(person_id)
        resp.etag = tag = entity_tag(person_id, row[2])
        if if_none_match_hits(req, tag):
            resp.status = falcon.HTTP_304
            return
        # What resp.media would send, but without looking its handler up: the hot path.
        resp.text = summary_json(row[0], row[1])

    def on_put(self, req, resp, person_id):
        versions = self._if_match(req, person_id)
        fields = clean_person(read_json(req, self._body_timeout), person_id=person_id)
        self._update(resp, person_id, fields, versions)

    def on_patch(self, req, resp, person_id):
        versions = self._if_match(req, person_id)
        patch = read_json(req, self._body_timeout, media_types=(JSON, MERGE_PATCH))
        fields = clean_person(patch, person_id=person_id, partial=True)
        self._update(resp, person_id, fields, versions)

    def on_delete(self, req, resp, person_id):
        versions = self._if_match(req, person_id)
        if not models.delete_person(person_id, versions):
            raise _unchanged_or_gone(person_id)
        models.erase_traces()
        resp.status = falcon.HTTP_204

    def _if_match(self, req, person_id):
        if self._require_if_match and req.if_match is None:
            raise falcon.HTTPPreconditionRequired(
                description="If-Match: send the person's ETag (from GET or the last write).")
        return if_match_versions(req, person_id)

    @staticmethod
    def _update(resp, person_id, fields, versions):
        try:
            person = models.update_person(person_id, fields, versions)
        except peewee.IntegrityError:
            raise _conflict()
        if person is None:
            raise _unchanged_or_gone(person_id)
        resp.etag = entity_tag(person_id, person.version)
        resp.media = person_document(person)


class Health:
    def on_get(self, req, resp):
        resp.media = {'status': 'ok'}


class Readiness:
    """Ready while writes work (see models.readiness_problem); the log says why not."""

    def __init__(self, limiter=None):
        self._limiter = limiter

    def on_get(self, req, resp):
        if models.readiness_problem():
            raise database_unavailable('Writes to the database fail; the log says why.')
        resp.media = {'status': 'ready'}
        # Still ready: writes go on unlimited (ratelimit.py), and every replica shares the store.
        if self._limiter and not self._limiter.storage_answers():
            resp.media['rate_limit'] = 'storage unreachable: writes are not limited'


# --- Assembly -------------------------------------------------------------------------------

def create_app(config, courier):
    """The WSGI app; `courier` delivers the welcome mails that POST queues."""
    router = Router()
    middleware = [metrics.RequestMetrics(router, count=config.metrics), RequestId(),
                  SecurityHeaders()]
    limiter = None
    if rate_limiting_enabled(config.rate_limit):
        limiter = ratelimit.Limiter(config.rate_limit,
                                    ratelimit.open_storage(config.rate_limit_storage),
                                    metrics.RATE_LIMIT_UNCHECKED.inc)
        middleware.append(RateLimit(limiter, parse_networks(config.forwarded_allow_ips)))
    if config.api_token:
        middleware.append(BearerToken(config.api_token))
    if not models.is_sqlite():
        middleware.append(ConnectionPerRequest())
    app = falcon.App(middleware=middleware, router=router)
    app.resp_options.media_handlers[JSON] = falcon.media.JSONHandler(dumps=encode_json)
    app.req_options.strip_url_path_trailing_slash = True
    app.set_error_serializer(serialize_error)
    app.add_error_handler(Exception, handle_unexpected)
    app.add_error_handler((peewee.DatabaseError, peewee.InterfaceError, sqlite3.Error),
                          handle_database_error)
    app.add_error_handler(falcon.HTTPRouteNotFound, handle_route_not_found)
    app.add_route('/person', PersonCollection(courier, config.idempotency_ttl,
                                              config.body_timeout))
    app.add_route(PERSON_ROUTE, PersonItem(config.require_if_match, config.body_timeout))
    app.add_route('/healthz', Health())
    app.add_route('/readyz', Readiness(limiter))
    app.add_route('/openapi.json', OpenAPI(openapi_document()))
    app.add_route('/', Index())
    app.add_route('/docs', DocsPage())
    app.add_route(ASSETS_PATH + '/{name}', DocsAsset())
    if config.metrics:
        app.add_route('/metrics', metrics.Metrics(outbox.queue_status))
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

"""The HTTP edge: middleware every request crosses before and after its resource (request
ids, security headers, bearer token, rate limit, connection hand-back), and
the JSON error serializer and handlers that turn every failure into the same error body.
"""

import hmac
import ipaddress
import itertools
import json
import logging
import os
import re
import uuid

import falcon

import logs
import metrics
import models
from models import db

log = logging.getLogger('personapi')

JSON = 'application/json'
REQUEST_ID = re.compile(r'[A-Za-z0-9._:-]{1,128}\Z')
WRITE_METHODS = frozenset({'POST', 'PUT', 'PATCH', 'DELETE'})
# Never behind the token: the probes, the documentation with Swagger UI's files under /docs/,
# and metrics (counts, no personal data).
OPEN_PATHS = frozenset({'/', '/healthz', '/readyz', '/openapi.json', '/docs', '/metrics'})
OPEN_PREFIX = '/docs/'


class RequestId:
    """Accept a well-formed X-Request-ID or make one, and return it; logs quote it.

    A made id is a random prefix, new in each process, and a counter: unique without the
    cost of a uuid4 per request.
    """

    def process_request(self, req, resp):
        given = req.env.get('HTTP_X_REQUEST_ID')  # req.get_header('X-Request-ID'), for less
        req.context.request_id = given if given and REQUEST_ID.match(given) else _new_request_id()
        logs.request_id.set(req.context.request_id)

    def process_response(self, req, resp, resource, req_succeeded):
        resp.set_header('X-Request-ID', req.context.request_id)
        logs.request_id.set(None)  # this thread's next lines are about no request


def _new_request_id():
    prefix, counter = _request_ids
    return f'{prefix}-{next(counter)}'


def _new_request_id_prefix():
    global _request_ids
    _request_ids = (uuid.uuid4().hex[:12], itertools.count(1))  # replaced as one


_new_request_id_prefix()
# A worker must not repeat its parent's ids.
os.register_at_fork(after_in_child=_new_request_id_prefix)


class SecurityHeaders:
    """Responses are never sniffed as another type, and never cached (they hold personal
    data) unless their resource says how (the documentation's files)."""

    def process_response(self, req, resp, resource, req_succeeded):
        resp.set_header('X-Content-Type-Options', 'nosniff')
        if not (req_succeeded and resp.get_header('Cache-Control')):
            resp.set_header('Cache-Control', 'no-store')


class BearerToken:
    """With API_TOKEN set, every route but the open ones needs `Authorization: Bearer <token>`.

    Checked before routing, so an unknown id without the token is 401, not 404.
    """

    def __init__(self, token):
        self._token = token.encode()

    def process_request(self, req, resp):
        if req.path in OPEN_PATHS or req.path.startswith(OPEN_PREFIX):
            return
        scheme, _, given = (req.get_header('Authorization') or '').partition(' ')
        if scheme.lower() != 'bearer' or not hmac.compare_digest(given.strip().encode(),
                                                                  self._token):
            raise falcon.HTTPUnauthorized(title='Unauthorized',
                                          description='Send Authorization: Bearer <token>.',
                                          challenges=['Bearer'])


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
    """Writes per client address, counted by ratelimit.Limiter: 429 past the budget."""

    def __init__(self, limiter, trusted_proxies=()):
        self._limiter = limiter
        self._trusted_proxies = trusted_proxies

    def process_request(self, req, resp):
        if req.method not in WRITE_METHODS:
            return
        retry_after = self._limiter.hit(client_address(req, self._trusted_proxies))
        if retry_after is not None:
            raise falcon.HTTPTooManyRequests(
                description=f'At most {self._limiter.limit} writes per client; try again later.',
                retry_after=retry_after)


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


def handle_database_error(req, resp, error, params):
    """The database failing is 503, and counts against write health (which logs each change
    of it, once: not a line per request); any other database error is the code's, a 500."""
    if not models.is_database_failure(error):
        return handle_unexpected(req, resp, error, params)
    metrics.DATABASE_ERRORS.inc()
    models.note_database_failure(error)
    raise database_unavailable()


def database_unavailable(description='Try again shortly.'):
    return falcon.HTTPServiceUnavailable(title='Database unavailable', description=description,
                                         retry_after=5)


def handle_unexpected(req, resp, error, params):
    log.exception('unexpected error (request %s)', req.context.request_id)
    raise falcon.HTTPInternalServerError(
        description=f'Something went wrong; quote request id {req.context.request_id}.')

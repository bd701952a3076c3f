"""Prometheus metrics: the metric objects, the middleware that counts and times requests,
and the /metrics resource (prometheus-client's text format).

Under gunicorn every worker writes its samples to files in PROMETHEUS_MULTIPROC_DIR
(prometheus-client's multiprocess mode; gunicorn.conf.py names the directory before this
module is first imported) and a scrape of any worker adds up all of them. Without that
variable (tests, `python mailer.py`) the samples live in this process.

Requests are recorded in memory and handed to prometheus-client by flush(): once a second
in each worker (start_flushing), at a scrape of that worker and when it stops. Its
multiprocess values take one lock for the whole process and write a file at every change;
done in each request, under load that cost more than the rest of the app (GET /person/{id}
at 0.72 of the bare ceiling against 0.95 without metrics, in `make bench`). So flush() adds
the requests up per series first and makes each change once: three per request, handed
over one by one, cost about 20,000 instructions a GET, a sixth of the app's own.
"""

import bisect
import collections
import logging
import math
import os
import re
import threading
import time

import prometheus_client
from prometheus_client import multiprocess
from prometheus_client.core import GaugeMetricFamily

import logs

log = logging.getLogger('personapi.metrics')


class Histogram(prometheus_client.Histogram):
    """prometheus-client's histogram, which can also take many observations at once.

    prometheus-client has no such call, so this one changes the values observe() changes;
    the library is pinned, and a test checks that both leave the same samples.
    """

    def observe_many(self, total, counts):
        """Add observations that sum to `total`, `counts[i]` of them in the i-th bucket (the
        first whose upper bound is not below them, as observe() files one)."""
        self._raise_if_not_observable()
        self._sum.inc(total)
        for bucket, count in zip(self._buckets, counts):
            if count:
                bucket.inc(count)


DURATION_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, math.inf)
REGISTRY = prometheus_client.CollectorRegistry()
HTTP_REQUESTS = prometheus_client.Counter(
    'personapi_http_requests', 'HTTP requests answered, by method, route template and status.',
    ['method', 'route', 'status'], registry=REGISTRY)
HTTP_REQUEST_DURATION = Histogram(
    'personapi_http_request_duration_seconds',
    'Time the app took to answer, by method and route template.', ['method', 'route'],
    buckets=DURATION_BUCKETS, registry=REGISTRY)
MAIL_DELIVERIES = prometheus_client.Counter(
    'personapi_mail_deliveries', 'Welcome mails handed to SMTP (sent), put back for a later '
    'try (retried) or given up (failed).', ['result'], registry=REGISTRY)
DATABASE_ERRORS = prometheus_client.Counter(
    'personapi_database_errors', 'Database failures met while serving a request or '
    'delivering mail.', registry=REGISTRY)
RATE_LIMIT_UNCHECKED = prometheus_client.Counter(
    'personapi_rate_limit_unchecked_writes', 'Writes let through without a rate-limit check '
    'because its storage could not be reached (fail-open).', registry=REGISTRY)

# The methods counted by name; any other (a client may send any token) counts as one label,
# so that no client can grow the number of series.
METHODS = frozenset({'GET', 'HEAD', 'POST', 'PUT', 'PATCH', 'DELETE', 'OPTIONS'})
OTHER_METHOD = 'other'
_CONVERTER = re.compile(r'\{(\w+)[^}]*\}')


FLUSH_SECONDS = 1.0
MAX_UNRECORDED = 10_000  # past this, a request flushes itself: no flusher must not mean a leak
_unrecorded = collections.deque()  # ((method, route, status), seconds) per request
_series = {}  # (method, route, status) -> its counter and histogram: labels() costs as much again


class RequestMetrics:
    """Put each request's route template where the access log finds it and, when `count`,
    count and time the request.

    The first middleware: its process_response runs last, so the time covers the others.
    A request refused before routing (401, 429) is routed here with `router`, so it still
    counts on its route.
    """

    def __init__(self, router, count=True):
        self._router = router
        self._count = count
        self._routes = {None: logs.UNMATCHED_ROUTE}  # template -> label, e.g. /person/{person_id}

    def process_request(self, req, resp):
        req.context.started = time.perf_counter()

    def process_response(self, req, resp, resource, req_succeeded):
        route = self._route(req)
        req.env[logs.ROUTE_KEY] = route
        if self._count:
            method = req.method if req.method in METHODS else OTHER_METHOD
            _unrecorded.append(((method, route, resp.status_code),
                                time.perf_counter() - req.context.started))
            if len(_unrecorded) > MAX_UNRECORDED:
                flush()

    def _route(self, req):
        template = req.uri_template
        if template is None:
            found = self._router.find(req.path, req)
            template = found[3] if found else None
        return self._routes.get(template) or self._routes.setdefault(
            template, _CONVERTER.sub(r'{\1}', template))


def flush():
    """Hand the requests recorded since the last flush to prometheus-client, each series'
    counts and durations added up first."""
    for key, (total, *counts) in _tally_unrecorded().items():
        requests, duration = _series.get(key) or _series.setdefault(
            key, (HTTP_REQUESTS.labels(*key), HTTP_REQUEST_DURATION.labels(*key[:2])))
        requests.inc(sum(counts))
        duration.observe_many(total, counts)


def _tally_unrecorded():
    """{series: [seconds in all, then the count in each duration bucket]}, emptying the
    record of requests."""
    tallies = {}
    while True:
        try:
            key, seconds = _unrecorded.popleft()  # atomic: concurrent flushes share the work
        except IndexError:
            return tallies
        tally = tallies.get(key) or tallies.setdefault(key, [0.0] + [0] * len(DURATION_BUCKETS))
        tally[0] += seconds
        tally[1 + bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1


def start_flushing():
    """Flush every FLUSH_SECONDS in a thread of this process (call it in each worker): a
    scrape of any worker then shows every worker's requests within a second."""
    def run():
        while True:
            time.sleep(FLUSH_SECONDS)
            flush()
    threading.Thread(target=run, name='metrics-flush', daemon=True).start()


class OutboxCollector:
    """The outbox's state, read from the database at each scrape: right across replicas.

    `queue_status()` returns {'pending': int, 'failed': int, 'oldest_pending_age': seconds
    or None}. When the database fails, the scrape goes on without these gauges.
    """

    def __init__(self, queue_status):
        self._queue_status = queue_status

    def collect(self):
        try:
            status = self._queue_status()
        except Exception as error:
            log.warning('outbox state unavailable for /metrics: %s', type(error).__name__)
            DATABASE_ERRORS.inc()
            return
        mails = GaugeMetricFamily('personapi_outbox_mails', 'Welcome mails in the outbox, '
                                  'by state.', labels=['state'])
        for state in ('pending', 'failed'):
            mails.add_metric([state], status[state])
        yield mails
        yield GaugeMetricFamily('personapi_outbox_oldest_pending_seconds',
                                'Age of the oldest pending welcome mail; 0 when none is '
                                'pending.', value=status['oldest_pending_age'] or 0.0)


class Metrics:
    """GET /metrics: every worker's samples and the outbox's state."""

    def __init__(self, queue_status):
        self._registry = prometheus_client.CollectorRegistry()
        if os.environ.get('PROMETHEUS_MULTIPROC_DIR'):
            multiprocess.MultiProcessCollector(self._registry)
        else:
            self._registry.register(REGISTRY)
        self._registry.register(OutboxCollector(queue_status))

    def on_get(self, req, resp):
        flush()
        resp.content_type = prometheus_client.CONTENT_TYPE_LATEST
        resp.data = prometheus_client.generate_latest(self._registry)

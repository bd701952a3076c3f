"""GET /metrics: in-process for what each request counts, against real gunicorn for the sums
across workers, a killed worker and the outbox's state."""

import dataclasses
import os
import signal
import time
import urllib.request

import prometheus_client
import pytest
import webtest
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import metrics
import models
import personapi
from docs import ASSETS_PATH
from support import Service, SmtpSink, free_port, http, wait_until
from test_deploy_manifest import api_container, container_port, one
from test_service import in_parallel

ADA = {'first_name': 'Ada', 'last_name': 'Lovelace', 'email': 'ada@example.com'}
TOKEN = 'metrics-test-token'
TEMPLATES = {'/person', '/person/{person_id}', '/healthz', '/readyz', '/openapi.json', '/metrics',
             '/', '/docs', ASSETS_PATH + '/{name}', 'unmatched'}


def value(text, name, **labels):
    """The sum of the samples called `name` whose labels include `labels`."""
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples
               if sample.name == name and labels.items() <= sample.labels.items())


def requests_total(text, **labels):
    return value(text, 'personapi_http_requests_total', **labels)


def samples(registry):
    """{(name, labels): value} of what a scrape shows, but for the creation times."""
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(generate_latest(registry).decode())
            for sample in family.samples if not sample.name.endswith('_created')}


def app_with(config, courier, **changes):
    return webtest.TestApp(personapi.create_app(dataclasses.replace(config, **changes), courier))


# --- What one request counts (in-process) ---------------------------------------------------

ROUTES = [  # method, path, the route it counts on, status
    ('GET', '/person/1', '/person/{person_id}', 200),
    ('GET', '/person/424242', '/person/{person_id}', 404),
    ('PUT', '/person/1', '/person/{person_id}', 415),
    ('POST', '/person', '/person', 415),
    ('POST', '/person/', '/person', 415),
    ('DELETE', '/person', '/person', 405),
    ('GET', '/person/abc', 'unmatched', 404),
    ('GET', '/person/-1', 'unmatched', 404),
    ('GET', '/nowhere/ada@example.com', 'unmatched', 404),
    ('GET', '/healthz', '/healthz', 200),
    ('BREW', '/person/1', '/person/{person_id}', 400),  # any other method: one label
]


@pytest.mark.parametrize('method, path, route, status', ROUTES)
def test_a_request_counts_on_its_route_template_never_its_path(client, method, path, route,
                                                              status):
    client.post_json('/person', ADA, status=201)
    before = client.get('/metrics').text
    client.request(path, method=method, status=status)
    after = client.get('/metrics').text
    counted = method if method != 'BREW' else 'other'
    labels = {'method': counted, 'route': route, 'status': str(status)}
    assert requests_total(after, **labels) - requests_total(before, **labels) == 1
    histogram = 'personapi_http_request_duration_seconds_count'
    assert value(after, histogram, method=counted, route=route) - value(
        before, histogram, method=counted, route=route) == 1
    routes = {sample.labels['route'] for family in text_string_to_metric_families(after)
              for sample in family.samples if 'route' in sample.labels}
    assert routes <= TEMPLATES  # never a raw path, so never an id or an address


@pytest.mark.parametrize('path, route', [('/person/1', '/person/{person_id}'),
                                         ('/person', '/person')])
def test_a_request_refused_before_routing_still_counts_on_its_route(config, courier, path,
                                                                    route):
    guarded = app_with(config, courier, api_token=TOKEN)
    before = guarded.get('/metrics').text  # open like the probes: no token
    guarded.get(path, status=401)
    after = guarded.get('/metrics').text
    labels = {'method': 'GET', 'route': route, 'status': '401'}
    assert requests_total(after, **labels) - requests_total(before, **labels) == 1


def test_metrics_off_removes_the_route_and_stops_counting(config, courier, client):
    before = client.get('/metrics').text
    quiet = app_with(config, courier, metrics=False)
    quiet.get('/healthz', status=200)
    quiet.get('/metrics', status=404)
    assert requests_total(client.get('/metrics').text, route='/healthz') == requests_total(
        before, route='/healthz')


def test_an_unreachable_database_is_counted_and_the_scrape_still_answers(config, courier):
    before = value(app_with(config, courier).get('/metrics').text,
                   'personapi_database_errors_total')
    models.connect(f'postgresql://postgres@127.0.0.1:{free_port()}/gone')  # nobody listens
    app = app_with(config, courier)
    app.get('/person/1', status=503)
    scraped = app.get('/metrics', status=200).text  # the outbox gauges are left out
    assert 'personapi_outbox_mails' not in scraped
    assert value(scraped, 'personapi_database_errors_total') - before >= 1
    assert value(app.get('/metrics').text, 'personapi_database_errors_total') - before >= 2


def test_the_outbox_state_and_deliveries_are_scraped(client, courier, smtp):
    sent_before = value(client.get('/metrics').text, 'personapi_mail_deliveries_total',
                        result='sent')
    for n in range(3):
        client.post_json('/person', {**ADA, 'email': f'ada{n}@example.com'}, status=201)
    pending = client.get('/metrics').text
    assert value(pending, 'personapi_outbox_mails', state='pending') == 3
    assert value(pending, 'personapi_outbox_mails', state='failed') == 0
    assert value(pending, 'personapi_outbox_oldest_pending_seconds') >= 0
    courier.deliver_due()
    delivered = client.get('/metrics').text
    assert value(delivered, 'personapi_outbox_mails', state='pending') == 0
    assert value(delivered, 'personapi_outbox_oldest_pending_seconds') == 0
    assert value(delivered, 'personapi_mail_deliveries_total', result='sent') - sent_before == 3


def test_a_refused_mail_is_counted_failed_and_stays_in_the_outbox(client, courier, smtp):
    failed_before = value(client.get('/metrics').text, 'personapi_mail_deliveries_total',
                          result='failed')
    smtp.reply = '550 no such mailbox'
    client.post_json('/person', ADA, status=201)
    courier.deliver_due()
    scraped = client.get('/metrics').text
    assert value(scraped, 'personapi_outbox_mails', state='failed') == 1
    assert value(scraped, 'personapi_mail_deliveries_total', result='failed') - failed_before == 1


def test_the_oldest_pending_age_grows_while_smtp_is_down(config, client):
    down = dataclasses.replace(config, smtp_port=free_port())  # nobody listens
    courier = personapi.mailer.Courier.from_config(down)
    client.post_json('/person', ADA, status=201)
    ages = []
    for _ in range(3):
        courier.deliver_due()  # fails, and schedules the next try
        ages.append(value(client.get('/metrics').text, 'personapi_outbox_oldest_pending_seconds'))
        time.sleep(1.1)
    assert ages[0] < ages[1] < ages[2]


def test_the_openapi_document_lists_metrics(client):
    assert 'get' in client.get('/openapi.json').json['paths']['/metrics']


def test_the_pod_is_annotated_for_scraping():
    pod = one('Deployment', 'personapi')['spec']['template']['metadata']
    annotations = pod['annotations']
    assert annotations['prometheus.io/scrape'] == 'true'
    assert annotations['prometheus.io/path'] == '/metrics'
    assert container_port(api_container(), int(annotations['prometheus.io/port'])) == 8000


# --- Across gunicorn's workers --------------------------------------------------------------

def scrape(service):
    with urllib.request.urlopen(f'{service.url}/metrics', timeout=10) as response:
        assert response.status == 200
        return response.read().decode()


def get_many(service, paths):
    """GET each path on a new connection, in parallel: the workers share them out."""
    return in_parallel([lambda path=path: service.request('GET', path) for path in paths],
                       threads=8)


def workers_of(service):
    master = service.process.pid
    with open(f'/proc/{master}/task/{master}/children') as children:
        return [int(pid) for pid in children.read().split()]


def test_counts_of_every_worker_add_up_and_survive_a_killed_worker(service):
    person_route = {'route': '/person/{person_id}'}
    results = get_many(service, [f'/person/{n}' for n in range(1, 101)])
    # A made request id starts with its process's own prefix: go on until both workers
    # served (the kernel may hand one worker every connection of a short burst).
    while len({headers['X-Request-ID'].split('-')[0] for _, headers, _ in results}) < 2:
        assert len(results) < 1000
        results += get_many(service, [f'/person/{n}' for n in range(1, 21)])
    assert [status for status, _, _ in results] == [404] * len(results)
    # Each worker hands its counts over within a second (metrics.FLUSH_SECONDS).
    assert wait_until(lambda: requests_total(scrape(service), **person_route) == len(results))

    victim = workers_of(service)[0]
    os.kill(victim, signal.SIGKILL)
    assert wait_until(lambda: victim not in workers_of(service) and len(workers_of(service)) == 2)
    for _ in range(10):  # whichever worker answers, old or new
        assert requests_total(scrape(service), **person_route) == len(results)
    get_many(service, [f'/person/{n}' for n in range(1, 21)])
    assert wait_until(lambda: requests_total(scrape(service), **person_route) ==
                      len(results) + 20)


def test_a_mail_pending_while_smtp_is_down_shows_until_it_is_sent(service_env, tmp_path):
    sink = SmtpSink(port=free_port())  # not started yet: connections are refused
    service = Service({**service_env, 'SMTP_PORT': str(sink.port)},
                      log_path=tmp_path / 'gunicorn.log').start()
    try:
        assert service.request('POST', '/person', ADA)[0] == 201
        assert wait_until(lambda: value(scrape(service), 'personapi_mail_deliveries_total',
                                        result='retried') >= 1)
        assert value(scrape(service), 'personapi_outbox_mails', state='pending') == 1
        sink.start()
        assert sink.wait_for(1, timeout=20) == 1
        assert wait_until(lambda: value(scrape(service), 'personapi_outbox_mails',
                                        state='pending') == 0)
        assert value(scrape(service), 'personapi_mail_deliveries_total', result='sent') == 1
    finally:
        service.kill()
        sink.stop()


def test_metrics_off_under_gunicorn_serves_no_metrics(service_env, tmp_path):
    service = Service({**service_env, 'METRICS': 'off'}, log_path=tmp_path / 'gunicorn.log').start()
    try:
        assert http('GET', f'{service.url}/metrics')[0] == 404
        assert http('GET', f'{service.url}/healthz')[0] == 200
    finally:
        service.stop()


def test_counts_do_not_pile_up_where_nothing_flushes_them(client, monkeypatch):
    before = requests_total(client.get('/metrics').text, route='/healthz')
    monkeypatch.setattr(metrics, 'MAX_UNRECORDED', 5)
    for _ in range(20):
        client.get('/healthz')
        assert len(metrics._unrecorded) <= 5
    assert requests_total(client.get('/metrics').text, route='/healthz') - before == 20


def test_a_flush_counts_exactly_as_observing_each_request_would(monkeypatch):
    # On a bucket's bound, between bounds, under the first and past the last, in two series.
    durations = [0.0, 0.0001, 0.001, 0.0010001, 0.25, 0.3, 0.3, 10.0, 11.0, 250.0]
    keys = [('GET', '/person/{person_id}', 200), ('POST', '/person', 201)]
    metrics.flush()  # earlier requests, to the real series
    flushed, expected = CollectorRegistry(), CollectorRegistry()
    monkeypatch.setattr(metrics, 'HTTP_REQUESTS', Counter(
        'requests', 'r', ['method', 'route', 'status'], registry=flushed))
    monkeypatch.setattr(metrics, 'HTTP_REQUEST_DURATION', metrics.Histogram(
        'duration', 'd', ['method', 'route'], buckets=metrics.DURATION_BUCKETS, registry=flushed))
    monkeypatch.setattr(metrics, '_series', {})
    requests = Counter('requests', 'r', ['method', 'route', 'status'], registry=expected)
    duration = prometheus_client.Histogram('duration', 'd', ['method', 'route'],
                                           buckets=metrics.DURATION_BUCKETS, registry=expected)
    for index, seconds in enumerate(durations):
        key = keys[index % 2]
        metrics._unrecorded.append((key, seconds))
        requests.labels(*key).inc()
        duration.labels(*key[:2]).observe(seconds)
    metrics.flush()
    assert not metrics._unrecorded
    assert samples(flushed) == samples(expected)
    assert samples(flushed)[('duration_count', (('method', 'GET'),
                                                 ('route', '/person/{person_id}')))] == 5

"""deploy.yaml against the app and the Dockerfile: what a Kubernetes schema cannot check."""

import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from config import Config
from support import ROOT, one_engine

MANIFEST_TEXT = (ROOT / 'deploy.yaml').read_text(encoding='utf-8')
MANIFEST = list(yaml.safe_load_all(MANIFEST_TEXT))
DOCKERFILE = (ROOT / 'Dockerfile').read_text(encoding='utf-8')
NAME = 'app.kubernetes.io/name'
COMPONENT = 'app.kubernetes.io/component'


def objects(kind):
    return [doc for doc in MANIFEST if doc['kind'] == kind]


def one(kind, name):
    (found,) = [doc for doc in objects(kind) if doc['metadata']['name'] == name]
    return found


def pod_labels(deployment):
    return deployment['spec']['template']['metadata']['labels']


def api_container():
    (container,) = one('Deployment', 'personapi')['spec']['template']['spec']['containers']
    return container


def container_port(container, port):
    """A probe's or Service's port (a name or a number) as the container's port number."""
    for declared in container['ports']:
        if port in (declared['name'], declared['containerPort']):
            return declared['containerPort']
    raise AssertionError(f'{container["name"]} has no port {port!r}')


def configmap():
    return one('ConfigMap', 'personapi-config')['data']


def test_every_object_is_labelled():
    for doc in MANIFEST:
        labels = doc['metadata']['labels']
        assert labels[NAME] == 'personapi', doc['metadata']['name']
        assert labels[COMPONENT] in ('api', 'mail'), doc['metadata']['name']


def test_deployment_selectors_match_their_pods():
    for deployment in objects('Deployment'):
        selector = deployment['spec']['selector']['matchLabels']
        assert selector.items() <= pod_labels(deployment).items()
        assert selector[COMPONENT] == deployment['metadata']['labels'][COMPONENT]


def test_each_service_selects_one_deployment_and_its_port():
    for service in objects('Service'):
        selector = service['spec']['selector'].items()
        (target,) = [d for d in objects('Deployment') if selector <= pod_labels(d).items()]
        (container,) = target['spec']['template']['spec']['containers']
        for port in service['spec']['ports']:
            container_port(container, port['targetPort'])


def test_node_ports_are_the_readmes():
    node_ports = {service['metadata']['name']: [p.get('nodePort') for p in service['spec']['ports']]
                  for service in objects('Service')}
    assert node_ports['personapi'] == [30001]
    assert node_ports['mailpit-ui'] == [30025]


def test_one_writer_on_the_sqlite_volume():
    claim = one('PersistentVolumeClaim', 'personapi-data')
    spec = one('Deployment', 'personapi')['spec']
    assert claim['spec']['accessModes'] == ['ReadWriteOnce']
    assert spec['replicas'] == 1
    assert spec['strategy'] == {'type': 'Recreate'}


def test_the_container_port_is_the_images():
    bind = re.search(r'--bind 0\.0\.0\.0:(\d+)', DOCKERFILE)
    exposed = re.search(r'^EXPOSE (\d+)$', DOCKERFILE, re.MULTILINE)
    assert bind and exposed
    assert container_port(api_container(), 'http') == int(bind[1]) == int(exposed[1])


@one_engine  # the deployment's engine
@pytest.mark.parametrize('probe, path', [('startupProbe', '/healthz'),
                                         ('readinessProbe', '/readyz'),
                                         ('livenessProbe', '/healthz')])
def test_probes_ask_the_apps_health_routes(client, probe, path):
    check = api_container()[probe]['httpGet']
    assert check['path'] == path
    assert container_port(api_container(), check['port']) == 8000
    assert client.get(path).status_int == 200


def test_the_database_lives_on_the_claimed_volume():
    url = urlsplit(configmap()['DATABASE_URL'])
    assert url.scheme == 'sqlite'
    database_dir = str(Path(url.path[1:]).parent)  # sqlite:////data/x.db: the path /data/x.db
    mounts = {m['mountPath']: m['name'] for m in api_container()['volumeMounts']}
    volumes = {v['name']: v for v in one('Deployment', 'personapi')['spec']['template']['spec']
               ['volumes']}
    claim = volumes[mounts[database_dir]]['persistentVolumeClaim']['claimName']
    assert claim == 'personapi-data'


def test_tmp_is_writable_on_the_read_only_root():
    mounts = {m['mountPath']: m['name'] for m in api_container()['volumeMounts']}
    volumes = {v['name']: v for v in one('Deployment', 'personapi')['spec']['template']['spec']
               ['volumes']}
    assert 'emptyDir' in volumes[mounts['/tmp']]


def test_smtp_goes_to_the_mail_catcher():
    service = one('Service', configmap()['SMTP_HOST'])
    assert service['metadata']['labels'][COMPONENT] == 'mail'
    assert [p['port'] for p in service['spec']['ports']] == [int(configmap()['SMTP_PORT'])]


def test_the_manifest_sets_only_variables_the_app_reads():
    container = api_container()
    set_here = set(configmap()) | {variable['name'] for variable in container['env']}
    assert set_here <= set(Config.variables())
    assert [ref['configMapRef']['name'] for ref in container['envFrom']] == ['personapi-config']


def test_every_variable_the_app_reads_is_documented():
    missing = [name for name in Config.variables()
               if not re.search(rf'\b{name}\b', MANIFEST_TEXT)]
    assert not missing, f'deploy.yaml neither sets nor documents {missing}'


def test_the_api_token_comes_from_an_optional_secret():
    (token,) = [v for v in api_container()['env'] if v['name'] == 'API_TOKEN']
    assert token['valueFrom']['secretKeyRef']['optional'] is True


def test_the_pod_runs_as_the_images_user_locked_down():
    uid = int(re.search(r'^USER (\d+)', DOCKERFILE, re.MULTILINE)[1])
    pod = one('Deployment', 'personapi')['spec']['template']['spec']
    container = api_container()['securityContext']
    assert pod['automountServiceAccountToken'] is False
    assert pod['securityContext']['runAsUser'] == container['runAsUser'] == uid
    assert pod['securityContext']['fsGroup'] == uid
    assert pod['securityContext']['runAsNonRoot'] and container['runAsNonRoot']
    assert container['readOnlyRootFilesystem'] is True
    assert container['allowPrivilegeEscalation'] is False
    assert container['capabilities'] == {'drop': ['ALL']}
    assert pod['securityContext']['seccompProfile'] == {'type': 'RuntimeDefault'}


def init_containers():
    """The API pod's init containers by name, in the order they start."""
    pod = one('Deployment', 'personapi')['spec']['template']['spec']
    return {container['name']: container for container in pod['initContainers']}


def test_only_chown_runs_as_root_to_hand_the_volumes_to_the_images_user():
    uid = int(re.search(r'^USER (\d+)', DOCKERFILE, re.MULTILINE)[1])
    init = init_containers()['data-owner']
    assert [name for name, container in init_containers().items()
            if container['securityContext'].get('runAsUser') == 0] == ['data-owner']
    assert init['image'] == api_container()['image']
    assert init['volumeMounts'] == [{'name': 'data', 'mountPath': '/data'},
                                    {'name': 'replica', 'mountPath': '/replica'}]
    assert init['command'][-1].startswith('for folder in /data /replica;')
    assert f'|| chown {uid}:{uid} $folder; done' in init['command'][-1]
    context = init['securityContext']
    assert context['capabilities'] == {'drop': ['ALL'], 'add': ['CHOWN']}
    assert context['readOnlyRootFilesystem'] is True
    assert context['allowPrivilegeEscalation'] is False


def test_the_mail_catcher_runs_a_release_with_the_crash_fix():
    (container,) = one('Deployment', 'mailpit')['spec']['template']['spec']['containers']
    version = tuple(map(int, container['image'].rpartition(':v')[2].split('.')))
    assert version >= (1, 34, 0)  # GHSA-v887-64wg-qqc9


def litestream_configuration():
    return yaml.safe_load(one('ConfigMap', 'personapi-litestream')['data']['litestream.yml'])


def test_litestream_replicates_the_database_as_a_sidecar_of_the_same_image():
    names = list(init_containers())
    assert names == ['data-owner', 'restore', 'litestream']  # the volume's owner, then its data
    sidecar = init_containers()['litestream']
    assert sidecar['restartPolicy'] == 'Always'  # a sidecar: up before the API, down after it
    assert sidecar['image'] == api_container()['image']
    assert sidecar['command'] == ['litestream', 'replicate', '-config',
                                  '/etc/litestream/litestream.yml']
    (database,) = litestream_configuration()['dbs']
    assert 'sqlite:///' + database['path'] == configmap()['DATABASE_URL']
    assert sidecar['securityContext'] == api_container()['securityContext']


def test_an_empty_volume_is_restored_from_the_replica_before_the_api_starts():
    restore = init_containers()['restore']
    assert restore['command'][:2] == ['litestream', 'restore']
    assert {'-if-db-not-exists', '-if-replica-exists'} <= set(restore['command'])
    (database,) = litestream_configuration()['dbs']
    assert restore['command'][-1] == database['path']
    assert 'restartPolicy' not in restore  # it runs to its end before the next starts
    assert restore['volumeMounts'] == init_containers()['litestream']['volumeMounts']
    assert {'name': 'data', 'mountPath': '/data'} in restore['volumeMounts']


def test_the_replicas_url_comes_from_an_optional_secret_over_the_demos():
    (database,) = litestream_configuration()['dbs']
    assert database['replica']['url'] == '${LITESTREAM_REPLICA_URL}'
    sources = init_containers()['litestream']['envFrom']
    assert sources == init_containers()['restore']['envFrom']
    default, secret = sources  # the later source wins
    assert one('ConfigMap', default['configMapRef']['name'])['data'] == {
        'LITESTREAM_REPLICA_URL': 'file:///replica/persons.db'}
    assert secret['secretRef'] == {'name': 'personapi-litestream', 'optional': True}
    snapshots = litestream_configuration()['snapshot']
    assert (snapshots['interval'], snapshots['retention']) == ('1h', '24h')  # personal-data.md


def test_the_start_has_minutes_to_check_the_database_before_liveness_counts():
    startup = api_container()['startupProbe']
    assert startup['periodSeconds'] * startup['failureThreshold'] >= 300

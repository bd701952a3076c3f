"""deploy.yaml as `podman kube play` can run it on a machine without a cluster.

    python deploy/kube_play_copy.py deploy.yaml HOST_PORT > played.yaml
    python deploy/kube_play_copy.py deploy.yaml --env   # the ConfigMap, as KEY=VALUE lines
    python deploy/kube_play_copy.py deploy.yaml --litestream  # Litestream's configuration file
    python deploy/kube_play_copy.py deploy.yaml --litestream-env  # its variables, KEY=VALUE
    python deploy/kube_play_copy.py deploy.yaml --restore  # the restore's command, a word a line

The copy differs from deploy.yaml only where podman or this machine requires it:
- no mail catcher: its image cannot be pulled here;
- the API's port is published on 127.0.0.1:HOST_PORT, standing in for the NodePort Service
  (podman plays no Services);
- no probes: podman 4.3 turns them into a curl run inside the image (which has no curl) and
  does not resolve named ports; the check requests the probes' paths itself;
- SMTP_HOST resolves to the pod's own loopback, so no DNS look-up leaves the pod (the mail
  then waits in the outbox, as it would while the mail catcher is down);
- no init container: podman 4.3 removes a finished init container in a race with its exit
  and then fails the whole play; the volume podman makes is writable by the image's user
  anyway, and `podman run` on a root-owned volume checks the case the init container is for,
  and `podman run` of the restore's command the case of the restore;
- the Litestream sidecar (an init container that keeps running, which podman 4.3 does not
  know) is an ordinary container of the pod, and without the optional Secret's reference.
"""

import sys

import yaml

COMPONENT = 'app.kubernetes.io/component'


def configmap_env(documents, name='personapi-config'):
    (configmap,) = [doc for doc in documents if doc['kind'] == 'ConfigMap'
                    and doc['metadata']['name'] == name]
    return configmap['data']


def played_copy(documents, host_port):
    played = [doc for doc in documents if doc['metadata']['labels'][COMPONENT] != 'mail']
    for doc in played:
        if doc['kind'] != 'Deployment':
            continue
        pod = doc['spec']['template']['spec']
        sidecars = [container for container in pod.pop('initContainers', [])
                    if container.pop('restartPolicy', None) == 'Always']
        for sidecar in sidecars:
            sidecar['envFrom'] = [source for source in sidecar['envFrom']
                                  if 'secretRef' not in source]
        pod['containers'].extend(sidecars)
        pod['hostAliases'] = [{'ip': '127.0.0.1',
                               'hostnames': [configmap_env(documents)['SMTP_HOST']]}]
        for container in pod['containers']:
            for probe in ('startupProbe', 'readinessProbe', 'livenessProbe'):
                container.pop(probe, None)
            for port in container.get('ports', []):
                port.update(hostIP='127.0.0.1', hostPort=host_port)
    return played


def main(path, option):
    with open(path, encoding='utf-8') as manifest:
        documents = list(yaml.safe_load_all(manifest))
    if option in ('--env', '--litestream-env'):
        name = 'personapi-config' if option == '--env' else 'personapi-litestream-env'
        for variable, value in configmap_env(documents, name).items():
            print(f'{variable}={value}')
    elif option == '--litestream':
        print(configmap_env(documents, 'personapi-litestream')['litestream.yml'], end='')
    elif option == '--restore':
        (deployment,) = [doc for doc in documents if doc['metadata']['name'] == 'personapi'
                         and doc['kind'] == 'Deployment']
        (restore,) = [container for container in deployment['spec']['template']['spec']
                      ['initContainers'] if container['name'] == 'restore']
        print('\n'.join(restore['command']))
    else:
        yaml.safe_dump_all(played_copy(documents, int(option)), sys.stdout, sort_keys=False)


if __name__ == '__main__':
    main(*sys.argv[1:])

"""deploy.yaml as `podman kube play` can run it on a machine without a cluster.

    python deploy/kube_play_copy.py deploy.yaml HOST_PORT > played.yaml
    python deploy/kube_play_copy.py deploy.yaml --env   # the ConfigMap, as KEY=VALUE lines

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
  anyway, and `podman run` on a root-owned volume checks the case the init container is for.
"""

import sys

import yaml

COMPONENT = 'app.kubernetes.io/component'


def configmap_env(documents):
    (configmap,) = [doc for doc in documents if doc['kind'] == 'ConfigMap']
    return configmap['data']


def played_copy(documents, host_port):
    played = [doc for doc in documents if doc['metadata']['labels'][COMPONENT] != 'mail']
    for doc in played:
        if doc['kind'] != 'Deployment':
            continue
        pod = doc['spec']['template']['spec']
        pod.pop('initContainers', None)
        pod['hostAliases'] = [{'ip': '127.0.0.1',
                               'hostnames': [configmap_env(documents)['SMTP_HOST']]}]
        for container in pod['containers']:
            container.pop('readinessProbe', None)
            container.pop('livenessProbe', None)
            for port in container['ports']:
                port.update(hostIP='127.0.0.1', hostPort=host_port)
    return played


def main(path, option):
    with open(path, encoding='utf-8') as manifest:
        documents = list(yaml.safe_load_all(manifest))
    if option == '--env':
        for name, value in configmap_env(documents).items():
            print(f'{name}={value}')
    else:
        yaml.safe_dump_all(played_copy(documents, int(option)), sys.stdout, sort_keys=False)


if __name__ == '__main__':
    main(*sys.argv[1:])

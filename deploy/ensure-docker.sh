#!/usr/bin/env bash
# Make sure a Docker Engine answers (idempotent; CI and the compose test call it):
# installs Debian's docker.io, docker-compose (1.29) and debootstrap when missing (root),
# starts dockerd by hand when no daemon answers (no systemd in CI containers), first
# with its defaults (overlay2, bridge networking), else with the vfs storage driver.
# CT_TRIAGE_DOCKERD_PIDFILE: where to write the pid of a dockerd this script starts (.ci/run
# stops that one, and only that one, when it ends).
set -euo pipefail
docker_bin=/usr/bin/docker
missing=()
[ -x /usr/sbin/dockerd ] || missing+=(docker.io)
[ -x /usr/bin/docker-compose ] || missing+=(docker-compose)
[ -x /usr/sbin/debootstrap ] || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then echo "need root to install ${missing[*]}" >&2; exit 1; fi
  echo "installing ${missing[*]} ..." >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq "${missing[@]}" >/dev/null
fi
ready() { "$docker_bin" info >/dev/null 2>&1; }
wait_ready() { for _ in $(seq 60); do ready && return 0; sleep 1; done; return 1; }
ready && exit 0
if [ "$(id -u)" != 0 ]; then echo "no Docker daemon answers and we are not root to start one" >&2; exit 1; fi
mkdir -p /var/log
started=
if [ ! -S /var/run/docker.sock ] || ! pgrep -x dockerd >/dev/null; then
  echo "starting dockerd ..." >&2
  nohup /usr/sbin/dockerd >/var/log/dockerd.log 2>&1 &
  started=$!
  [ -z "${CT_TRIAGE_DOCKERD_PIDFILE:-}" ] || echo "$started" >"$CT_TRIAGE_DOCKERD_PIDFILE"
fi
wait_ready && exit 0
[ -n "$started" ] || { echo "a dockerd runs but does not answer" >&2; exit 1; }
echo "dockerd did not come up with its defaults; retrying with --storage-driver=vfs" >&2
kill "$started" 2>/dev/null || true  # the daemon this script started, by its id
sleep 3
nohup /usr/sbin/dockerd --storage-driver=vfs >/var/log/dockerd.log 2>&1 &
[ -z "${CT_TRIAGE_DOCKERD_PIDFILE:-}" ] || echo "$!" >"$CT_TRIAGE_DOCKERD_PIDFILE"
wait_ready || { tail -20 /var/log/dockerd.log >&2; exit 1; }

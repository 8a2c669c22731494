#!/usr/bin/env bash
# Run a command the way the evaluator's container runs it, without Docker:
#   uid/gid 65534 (nobody), no capabilities, no-new-privileges, no HOME, a clean environment;
#   every existing mount read-only (the install, the venv, the interpreter);
#   MODELS_DIR mounted read-only over <repo>/models (as models/ at /app/models);
#   fresh tmpfs at /tmp and /run (rw,noexec,nosuid,nodev) and /dev/shm (64 MiB, Docker's default);
#   a private network namespace holding only the loopback interface.
# With EMBCAP_SANDBOX_APP_CACHE=PATH (under /tmp), the newest evaluator's additions: an exec-able
#   tmpfs at PATH (its /app/cache; /app does not exist on a host) and a 2 GB /dev/shm.
# Needs root: it creates a private mount and network namespace; nothing outside them changes.
#
# usage: tests/sandbox/sandbox.sh MODELS_DIR -- COMMAND [ARG...]
#   nsenter --target PID --mount --net -- tests/sandbox/sandbox.sh --join -- COMMAND...
#     runs another command as nobody inside an existing sandbox (its PID is the first command's).
set -euo pipefail

NOBODY=65534
drop_privileges() {
    exec setpriv --reuid="$NOBODY" --regid="$NOBODY" --clear-groups \
        --inh-caps=-all --ambient-caps=-all --bounding-set=-all --no-new-privs -- \
        env -i PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8 "$@"
}

if [ "${1:-}" = "--join" ]; then
    shift; [ "${1:-}" = "--" ] && shift
    drop_privileges "$@"
fi

if [ -z "${EMBCAP_SANDBOX_INNER:-}" ]; then
    EMBCAP_SANDBOX_INNER=1 exec unshare --mount --net --propagation private -- "$0" "$@"
fi

models=$(realpath "$1"); shift
[ "${1:-}" = "--" ] && shift
repo=$(cd "$(dirname "$0")/../.." && pwd)

ip link set lo up

# models/ first: it may live under /tmp, which is replaced below.
mount --bind "$models" "$repo/models"

# The interpreter lives under /root (mode 0700 here): show nobody only a read-only
# /root/.pyenv, under a tmpfs /root, keeping its path so the venv still works.
# A checkout under /tmp (a clone made there) would vanish under the new tmpfs: hold it aside.
case "$repo/" in
    /tmp/*) mkdir -p /run/.repo-hold; mount --rbind "$repo" /run/.repo-hold; repo_held=1 ;;
esac
mount -t tmpfs -o mode=1777 tmpfs /tmp
if [ -n "${repo_held:-}" ]; then
    mkdir -p "$repo"
    mount --move /run/.repo-hold "$repo"
    rmdir /run/.repo-hold
fi
if [ -d /root/.pyenv ]; then
    mkdir /tmp/.pyenv-hold
    mount --bind /root/.pyenv /tmp/.pyenv-hold
    mount -t tmpfs -o mode=0755,size=1m tmpfs /root
    mkdir /root/.pyenv
    mount --move /tmp/.pyenv-hold /root/.pyenv
    rmdir /tmp/.pyenv-hold
fi

# Everything read-only except the kernel's file systems and the tmpfs below.
awk '{print $5}' /proc/self/mountinfo | sort -u | while read -r point; do
    case "$point" in
        /proc|/proc/*|/sys|/sys/*|/dev|/dev/*|/tmp) continue ;;
    esac
    mount -o remount,bind,ro "$point" 2>/dev/null || echo "sandbox: could not make $point read-only" >&2
done

mount -o remount,noexec,nosuid,nodev,mode=1777 /tmp
mount -t tmpfs -o rw,noexec,nosuid,nodev,mode=1777 tmpfs /run
if [ -n "${EMBCAP_SANDBOX_APP_CACHE:-}" ]; then
    mkdir -p "$EMBCAP_SANDBOX_APP_CACHE"
    mount -t tmpfs -o rw,exec,nosuid,nodev,mode=1777,size=4g tmpfs "$EMBCAP_SANDBOX_APP_CACHE"
    mount -t tmpfs -o rw,noexec,nosuid,nodev,mode=1777,size=2g shm /dev/shm
else
    mount -t tmpfs -o rw,noexec,nosuid,nodev,mode=1777,size=64m shm /dev/shm
fi

drop_privileges "$@"

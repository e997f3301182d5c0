#!/usr/bin/env bash
# Start (or stop) a Docker engine for the compose tests on a machine where none runs and no
# init system starts one (the project's CI machines).
#   bash .ci/docker-engine.sh start   prints "started" or "running" (one was already there)
#   bash .ci/docker-engine.sh stop    stops the engine this script started (by its PID)
# The engine leaves the host's networking alone: no iptables rules, no forwarding, no bridge;
# containers use the host's network (docker/compose.host-network.yml). Needs root.
set -euo pipefail

PIDFILE="${TODI_DOCKERD_PIDFILE:-/var/run/todi-dockerd.pid}"
LOG="${TODI_DOCKERD_LOG:-/var/log/todi-dockerd.log}"
DOCKER=/usr/bin/docker  # Debian's CLI, which matches the Debian engine

case "${1:-}" in
    start)
        if "$DOCKER" info >/dev/null 2>&1; then
            echo running
            exit 0
        fi
        DOCKERD="$(PATH="$PATH:/usr/sbin:/sbin" command -v dockerd || true)"
        [ -n "$DOCKERD" ] || { echo "error: dockerd is not installed (bash .ci/install-deploy-tools.sh)" >&2; exit 1; }
        [ "$(id -u)" -eq 0 ] || { echo "error: starting dockerd needs root" >&2; exit 1; }
        # A stale PID file or socket from an engine that died would block a new one.
        rm -f /var/run/docker.pid
        nohup "$DOCKERD" --iptables=false --ip6tables=false --ip-forward=false \
            --ip-masq=false --bridge=none --storage-driver=overlay2 \
            --exec-opt native.cgroupdriver=cgroupfs > "$LOG" 2>&1 &
        echo $! > "$PIDFILE"
        for _ in $(seq 1 120); do
            if "$DOCKER" info >/dev/null 2>&1; then
                echo started
                exit 0
            fi
            if ! kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
                echo "error: dockerd exited; last lines of $LOG:" >&2
                tail -n 20 "$LOG" >&2
                exit 1
            fi
            sleep 0.5
        done
        echo "error: dockerd did not answer within 60 s; last lines of $LOG:" >&2
        tail -n 20 "$LOG" >&2
        exit 1
        ;;
    stop)
        [ -f "$PIDFILE" ] || exit 0
        pid="$(cat "$PIDFILE")"
        if kill "$pid" 2>/dev/null; then
            for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        fi
        rm -f "$PIDFILE"
        ;;
    *)
        echo "usage: docker-engine.sh start|stop" >&2
        exit 2
        ;;
esac

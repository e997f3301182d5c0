#!/bin/sh
# Health of a Ray node container: the cluster's GCS answers AND this container's own raylet is
# running. (`ray health-check` alone asks only the head, so a worker whose raylet keeps dying,
# e.g. on a port clash, would still look healthy.)
#   ray-node-health [GCS_ADDRESS]      (default: the local head, 127.0.0.1:6379)
ray health-check --address "${1:-127.0.0.1:6379}" >/dev/null 2>&1 || exit 1
for comm in /proc/[0-9]*/comm; do
    [ "$(cat "$comm" 2>/dev/null)" = raylet ] && exit 0
done
echo "no raylet process in this container" >&2
exit 1

#!/bin/sh
# PID 1 of one Pacemaker node of the test cluster (tests/src/pacemaker/mod.rs starts it as
# `ip netns exec NS unshare --mount --uts --pid --fork --mount-proc --propagation private
# node-init.sh NODE STATE_DIR OCF_DIR [FENCE_DIR]`).
#
# The node gets what a separate machine would have and the host must not share:
#   /run, /dev/shm   tmpfs (libqb's IPC buffers are named by PIDs, which repeat across PID
#                    namespaces; resource agents keep their state in /run/resource-agents)
#   /dev/tandem      tmpfs (the Tandem agent's stable device paths)
#   /tmp, /etc/corosync, /var/lib/{pacemaker,corosync}, /var/log/{pacemaker,corosync}
#                    bind mounts of the node's directories under STATE_DIR/NODE
#   /usr/lib/ocf/resource.d   overlaid with OCF_DIR (provider/agent: ocf:tandem:tandem)
#   /usr/sbin        overlaid with FENCE_DIR if given (fence_tandemlab: fenced only looks
#                    for fence agents there)
# then runs corosync and pacemakerd in the foreground.
#
# SIGTERM: orderly shutdown (pacemakerd stops the resources, then the Tandem agent, then
# corosync). SIGKILL from the host: the kernel kills the whole PID namespace — a crash of
# the node, after which its /run and /dev/shm are gone as after a reboot.
set -u
node=$1
state=$2
ocf=$3
fence=${4:-}
dir=$state/$node

hostname "$node"
mount -t tmpfs -o mode=755 tmpfs /run
mkdir -p /run/lock /run/resource-agents
chmod 1777 /run/lock
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mkdir -p /dev/tandem
mount -t tmpfs -o mode=755 tmpfs /dev/tandem
for m in /etc/corosync /var/lib/pacemaker /var/lib/corosync /var/log/pacemaker /var/log/corosync; do
    mount --bind "$dir$m" "$m" || { echo "node-init $node: cannot bind $m" >&2; exit 1; }
done
# Last: STATE_DIR must not be under /tmp, or the binds above would be hidden from here on.
mount --bind "$dir/tmp" /tmp
mount -t overlay overlay -o "lowerdir=$ocf:/usr/lib/ocf/resource.d" /usr/lib/ocf/resource.d
if [ -n "$fence" ]; then
    mount -t overlay overlay -o "lowerdir=$fence:/usr/sbin" /usr/sbin
fi

corosync_pid=
pacemaker_pid=
wait_gone() { # PID TENTHS
    n=0
    while kill -0 "$1" 2>/dev/null && [ "$n" -lt "$2" ]; do sleep 0.1; n=$((n + 1)); done
}
shutdown() {
    echo "node-init $node: orderly shutdown" >&2
    [ -n "$pacemaker_pid" ] && kill -TERM "$pacemaker_pid" 2>/dev/null && wait_gone "$pacemaker_pid" 900
    # The Tandem agent the OCF agent started (its resources are down by now).
    for f in /run/resource-agents/tandem-agent-*.pid; do
        [ -f "$f" ] || continue
        p=$(cat "$f")
        kill -TERM "$p" 2>/dev/null && wait_gone "$p" 300
    done
    [ -n "$corosync_pid" ] && kill -TERM "$corosync_pid" 2>/dev/null && wait_gone "$corosync_pid" 300
    exit 0
}
trap shutdown TERM INT

/usr/sbin/corosync -f >>"$dir/corosync.out" 2>&1 &
corosync_pid=$!
n=0
until /usr/sbin/corosync-cfgtool -s >/dev/null 2>&1 || [ "$n" -ge 100 ]; do sleep 0.1; n=$((n + 1)); done
PCMK_logfile=/var/log/pacemaker/pacemaker.log PCMK_logfacility=none \
    /usr/sbin/pacemakerd >>"$dir/pacemakerd.out" 2>&1 &
pacemaker_pid=$!
echo "node-init $node: corosync $corosync_pid, pacemakerd $pacemaker_pid" >&2

# PID 1 stays, reaping orphans, until it is told to stop or killed.
while :; do
    wait
    sleep 1
done

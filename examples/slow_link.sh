#!/usr/bin/env bash
# Two "hosts" on one machine: network namespaces lsgd0 and lsgd1 joined by a veth pair
# whose both directions are rate-limited with tc tbf (netem is not needed). Needs root.
#
#   examples/slow_link.sh up 1000              # 1000 Mbit/s each way
#   examples/slow_link.sh run -- python -m localsgd_optim.bench --models 12x512
#       (runs `torchrun --nnodes 2 --nproc-per-node $NPROC --rdzv-backend c10d <args>` on both hosts;
#        NPROC defaults to 1)
#   examples/slow_link.sh down
set -euo pipefail
A=lsgd0 B=lsgd1 IPA=10.77.0.1 IPB=10.77.0.2 PORT=${PORT:-29611}

need_root() {
  if [ "$(id -u)" != 0 ] || ! ip netns list >/dev/null 2>&1; then
    echo "slow_link.sh: needs root and iproute2 network namespaces; skipping" >&2; exit 3
  fi
}

up() {
  need_root
  local rate=${1:?usage: slow_link.sh up RATE_MBIT}
  down >/dev/null 2>&1 || true
  ip netns add $A && ip netns add $B
  ip link add veth-$A type veth peer name veth-$B
  ip link set veth-$A netns $A && ip link set veth-$B netns $B
  ip -n $A addr add $IPA/24 dev veth-$A && ip -n $B addr add $IPB/24 dev veth-$B
  for ns in $A $B; do ip -n $ns link set lo up; ip -n $ns link set veth-$ns up; done
  # burst must hold at least rate/HZ bytes; 1 MB is ample up to ~10 Gbit/s
  for ns in $A $B; do tc -n $ns qdisc add dev veth-$ns root tbf rate ${rate}mbit burst 1mb latency 100ms; done
  echo "hosts $A ($IPA) and $B ($IPB) joined at ${rate} Mbit/s each way"
}

down() {
  ip netns del $A 2>/dev/null || true
  ip netns del $B 2>/dev/null || true
}

run() {
  need_root
  [ "${1:-}" = "--" ] && shift
  local py=${1:?usage: slow_link.sh run -- python SCRIPT_OR_-m MODULE ARGS...}
  shift
  # c10d rendezvous: the store lives on lsgd0 and every rank meets there over the slow link
  local common=(--nnodes 2 --nproc-per-node ${NPROC:-1} --rdzv-backend c10d --rdzv-endpoint $IPA:$PORT --rdzv-id lsgd)
  # python -m torch.distributed.run == torchrun; each host talks over its own veth
  # is_host and --local-addr: both namespaces share one hostname, so torchrun can neither tell
  # which one hosts the store nor which address to advertise
  ip netns exec $B env GLOO_SOCKET_IFNAME=veth-$B OMP_NUM_THREADS=1 \
    $py -m torch.distributed.run "${common[@]}" --rdzv-conf is_host=0 --local-addr $IPB "$@" >/tmp/slow_link_node1.log 2>&1 &
  local other=$!
  trap "kill $other 2>/dev/null || true" EXIT  # never leave node 1 behind
  local rc=0
  ip netns exec $A env GLOO_SOCKET_IFNAME=veth-$A OMP_NUM_THREADS=1 \
    $py -m torch.distributed.run "${common[@]}" --rdzv-conf is_host=1 --local-addr $IPA "$@" || rc=$?
  wait $other || { echo "node 1 failed; its log: /tmp/slow_link_node1.log" >&2; tail -20 /tmp/slow_link_node1.log >&2; exit 1; }
  return $rc
}

case "${1:-}" in
  up) shift; up "$@" ;;
  down) down ;;
  run) shift; run "$@" ;;
  *) echo "usage: slow_link.sh up RATE_MBIT | run -- python ARGS... | down" >&2; exit 2 ;;
esac

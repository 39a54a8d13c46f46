#!/bin/bash
# restart-vllm: run on a node by `vllm-fleet rotate-key` (SSM Run Command), rendered by
# infra/ops/rotate.py. The node is already drained out of the load balancer.
# Stops the vLLM unit(s), re-fetches the API key(s) from Secrets Manager (the fetch unit
# writes /run/vllm-fleet/api-keys.yaml), starts vLLM again and waits for /health on every port.
# Stop first, then fetch, then start: vLLM loads the model once, with the new keys.
set -euo pipefail

readonly ports=(8000 8001)
readonly health_timeout_s=1200

# vllm.service, or vllm-0.service, vllm-1.service ... with several replicas per node;
# the pattern leaves out the vllm-fleet-*.service helpers.
mapfile -t units < <(systemctl list-units --all --plain --no-legend --type=service \
  'vllm.service' 'vllm-[0-9]*.service' | awk '{print $1}')
if ((${#units[@]} == 0)); then
  echo "restart-vllm: no vLLM unit on this node" >&2
  exit 1
fi

systemctl stop "${units[@]}"
systemctl restart vllm-fleet-fetch-key.service
systemctl start "${units[@]}"

deadline=$((SECONDS + health_timeout_s))
for port in "${ports[@]}"; do
  until curl -fsS -o /dev/null --max-time 5 "http://127.0.0.1:${port}/health"; do
    if ((SECONDS > deadline)); then
      echo "restart-vllm: vLLM on port ${port} not healthy after ${health_timeout_s}s" >&2
      journalctl -u "${units[0]}" -n 20 --no-pager >&2 || true
      exit 1
    fi
    sleep 5
  done
done
echo "restart-vllm: ${units[*]} healthy on port(s) ${ports[*]}"

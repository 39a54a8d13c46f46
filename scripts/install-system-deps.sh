#!/usr/bin/env bash
# Debian packages the test suite runs for real. Idempotent: installs only what is missing.
# Add a package here (one per line in PACKAGES) when a test starts to need a new tool.
set -euo pipefail

PACKAGES=(
  shellcheck        # lints every shell script we ship
  cloud-init        # `cloud-init schema` on rendered user-data
  prometheus        # promtool and a real Prometheus for the monitoring contract test
  debootstrap       # builds the rootfs the nspawn boot tests start
  systemd-container # systemd-nspawn
  haproxy           # local load balancer for the key-rotation test
  iproute2          # veth pairs for the two-node test
  prometheus-alertmanager  # amtool check-config on the rendered alertmanager.yml
  prometheus-node-exporter # a real node_exporter for the monitoring contract test
  strace            # proves the key fetch puts the key in no process's argv or environment
)

missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]} == 0)); then
  exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
  echo "install-system-deps: missing Debian packages: ${missing[*]} (run as root, or install them)" >&2
  exit 1
fi
apt-get update -q
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"

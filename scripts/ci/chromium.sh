#!/usr/bin/env bash
# Headless Chromium for the dashboard's browser test (trainer/tests/all/dashboard_e2e.rs):
# installs Debian's `chromium` when it is missing. Idempotent; needs root to install.
# The test itself only skips where no chromium can be found.
set -euo pipefail

log() { echo "[chromium] $*" >&2; }
if command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then
  echo "chromium: ready (already installed)"
  exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
  log "not root: cannot install chromium; the dashboard's browser test will skip"
  exit 0
fi
log "installing chromium"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium >/dev/null
echo "chromium: ready ($(chromium --version 2>/dev/null | tail -1))"

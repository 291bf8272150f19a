#!/usr/bin/env bash
# Install everything hpcq needs on a Debian 12 machine (run as root, or with sudo available):
#   - the real datasets the quickstart and the tests use (Debian packages, installed offline):
#       dataset-fashion-mnist  -> /usr/share/datasets/fashion-mnist   (the original, labelled dataset)
#       openclipart-png        -> /usr/share/openclipart/png          (the different, unlabelled dataset)
#   - a virtual environment in .venv with torch, torchvision, faiss-cpu and hpcq itself (editable, with dev tools).
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")"

TORCH_PIN=${HPCQ_TORCH_PIN:-"torch==2.14.1 torchvision==0.29.1"}
PYTHON=${PYTHON:-python3}
APT_PACKAGES=(dataset-fashion-mnist openclipart-png)

log() { printf '[install] %s\n' "$*"; }
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  log "creating .venv with $($PYTHON --version)"
  if ! "$PYTHON" -m venv .venv; then
    # Debian's own python3 needs the python3-venv package for this.
    rm -rf .venv
    log "installing python3-venv"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
    "$PYTHON" -m venv .venv
  fi
fi
# torch first and pinned: an unpinned torch would pull a newer multi-GB build.
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  log "installing $TORCH_PIN (a few minutes)"
  .venv/bin/pip install -q $TORCH_PIN
fi
log "installing hpcq and its dependencies"
.venv/bin/pip install -q -e ".[cpu,dev]"
log "done: .venv/bin/hpcq is ready"

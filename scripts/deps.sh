#!/usr/bin/env bash
# Installs what moed's build and tests need (Debian packages; root or sudo),
# skipping apt entirely when everything is already there.
set -euo pipefail
pkgs=(build-essential pkg-config libuv1-dev libyaml-dev libcjson-dev libopenmpi-dev openmpi-bin
      libcriterion-dev python3)
need=()
for pkg in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
if [ ${#need[@]} -gt 0 ]; then
    echo "deps: installing ${need[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
# numpy, for the oracle and the Python client's tests, for whichever python3 is first on PATH
if ! python3 -c 'import numpy' 2>/dev/null; then
    python3 -m pip install -q numpy 2>/dev/null ||
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends python3-numpy
fi
python3 -c 'import numpy'
echo "deps: ok"

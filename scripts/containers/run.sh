#!/usr/bin/env bash
# `make containers`: install what the container runs need (podman with runc, debootstrap, podman-compose, the
# Fashion-MNIST test set), build the images (build.sh) and run every check (check.py). Exits 0 only when all
# of it holds; the figures land in build/containers/*.json. Needs root (apt, podman as root).
#   PYTHON=.venv/bin/python scripts/containers/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
export CONTAINERS_CONF=$PWD/scripts/containers/containers.conf
DATA=${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
start=$SECONDS
stamp() { echo "== $* ($((SECONDS - start)) s)"; }

missing=()
# netavark with aardvark-dns: container networks whose DNS resolves compose service names (one address per
# replica); iptables: published ports; debian-archive-keyring: debootstrap checks the mirror's signatures.
for pkg in podman runc netavark aardvark-dns iptables uidmap slirp4netns debootstrap debian-archive-keyring; do
    dpkg -s "$pkg" 2>/dev/null | grep -q '^Status: install ok installed' || missing+=("$pkg")
done
[ -e "$DATA/t10k-images-idx3-ubyte.gz" ] || missing+=(dataset-fashion-mnist)
if [ ${#missing[@]} -gt 0 ]; then
    stamp "apt-get install ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# podman-compose from PyPI: Debian's (1.0.3) knows no compose profiles.
"$PYTHON" -c 'import importlib.metadata as m; assert m.version("podman-compose") == "1.6.0"' 2>/dev/null \
    || "$PYTHON" -m pip install -q podman-compose==1.6.0
COMPOSE=$(dirname "$PYTHON")/podman-compose

stamp "images"
scripts/containers/build.sh ${CONTAINER_IMAGES:-cpu train envoy prometheus gpu}
stamp "image checks"
"$PYTHON" scripts/containers/check.py images
stamp "serving container"
"$PYTHON" scripts/containers/check.py serving
stamp "compose topology"
"$PYTHON" scripts/containers/check.py compose --data-dir "$DATA" --podman-compose "$COMPOSE"
stamp "make containers: all checks hold"
echo "{\"seconds\": $((SECONDS - start))}" > build/containers/duration.json

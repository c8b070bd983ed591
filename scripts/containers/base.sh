#!/usr/bin/env bash
# A local stand-in for the official python:3.11-slim image, for machines that reach Debian's package mirrors
# and PyPI but no container registry (CI): Debian bookworm (Python 3.11, as in python:3.11-slim) built with
# debootstrap and loaded with `podman import`. `python` and `pip` are those of a virtual environment on PATH,
# so that the Dockerfiles run unchanged on either base.
#
#   scripts/containers/base.sh      # prints the image name; builds it only when no image of that name exists
#
# The tag is a hash of this script and the mirror: the image is built once per machine, and again only when
# what it is built from changes.
set -euo pipefail
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
PACKAGES=python3,python3-venv,ca-certificates
here=$(cd "$(dirname "$0")" && pwd)
tag=$(cat "$0" <(echo "$MIRROR") | sha256sum | cut -c1-12)
image=localhost/cnn-serving-base:$SUITE-$tag
if podman image exists "$image"; then
    echo "$image"
    exit 0
fi
work=$(mktemp -d /var/tmp/cnn-serving-base.XXXXXX)
trap 'rm -rf "$work"' EXIT
root=$work/root
echo "building $image (debootstrap $SUITE from $MIRROR)" >&2
nice -n 19 debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$root" "$MIRROR" >&2
chroot "$root" python3 -m venv /opt/python >&2
# Only what a container needs: no package lists or caches, no documentation, manuals or translations
# (python:3.11-slim drops them too).
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/cache/debconf/*-old \
    "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/* \
    "$root"/var/log/* "$root"/tmp/* "$root"/root/.cache
find "$root"/usr/lib/python3* "$root"/opt/python -name __pycache__ -prune -exec rm -rf {} +
tar -C "$root" -c . | podman import \
    --change 'ENV PATH=/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    - "$image" >&2
echo "$image"

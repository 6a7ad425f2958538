#!/usr/bin/env bash
# Builds caddy-mcc's IoT Edge module from this checkout:
#   build/<platform>/caddy   static Linux binaries (CGO_ENABLED=0) for
#                            amd64, arm64v8 and arm32v7 (GOARM=7)
#   build/rootfs/            CA certificates and the writable directories
#                            the FROM-scratch images copy
# and, where buildah is installed, the amd64 image (caddy-mcc:<version>-amd64).
#
#   deploy/iotedge/build.sh [--no-image]
#
# The other platforms' images build the same way on a builder that can
# (buildah bud --platform linux/arm64 ..., or the IoT Edge tooling with
# module.json); they need no emulation, as no RUN step executes.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
build="$here/build"
version="$(sed -n 's/.*"version": *"\([^"]*\)".*/\1/p' "$here/module.json" | head -n 1)"
image="caddy-mcc:${version}-amd64"

rm -rf "$build"
mkdir -p "$build/rootfs/etc/ssl/certs" "$build/rootfs/data" "$build/rootfs/config" "$build/rootfs/tmp"
chmod 1777 "$build/rootfs/tmp"
# Fills from https origins and network_proxy over TLS need the roots.
cp /etc/ssl/certs/ca-certificates.crt "$build/rootfs/etc/ssl/certs/"
# Caddy's admin API listens on localhost:2019; Docker mounts its own
# /etc/hosts over this one, other runtimes (and a plain chroot) may not.
printf '127.0.0.1\tlocalhost\n::1\tlocalhost\n' >"$build/rootfs/etc/hosts"

# Every platform is tried, so one that fails does not hide the others.
failed=()
for p in amd64:amd64: arm64v8:arm64: arm32v7:arm:7; do
	IFS=: read -r platform goarch goarm <<<"$p"
	echo "building $platform (GOARCH=$goarch${goarm:+ GOARM=$goarm})"
	if ! (cd "$repo" && CGO_ENABLED=0 GOOS=linux GOARCH="$goarch" GOARM="$goarm" \
		go build -trimpath -ldflags='-s -w' -o "$build/$platform/caddy" ./cmd/caddy); then
		failed+=("$platform")
	fi
done
finish() {
	if ((${#failed[@]})); then
		echo "FAILED to build: ${failed[*]}" >&2
		exit 1
	fi
}

if [[ "${1:-}" == "--no-image" ]]; then
	finish
	exit 0
fi
if ! command -v buildah >/dev/null; then
	echo "buildah is not installed: binaries built, no image (apt-get install buildah)"
	finish
	exit 0
fi
# chroot isolation and vfs storage work without user namespaces or
# overlay mounts, as in CI containers.
buildah --storage-driver vfs bud --isolation chroot --platform linux/amd64 \
	-f "$here/Dockerfile.amd64" -t "$image" "$here"
echo "built $image"
finish

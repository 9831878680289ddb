#!/usr/bin/env bash
# System packages for building and running the images without a Docker engine (Debian/Ubuntu, as root):
# buildah builds, podman + runc run (crun fails on this kind of machine), debootstrap makes the base.
set -euo pipefail
packages=(buildah podman runc debootstrap)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  echo "error: need root and apt-get to install ${missing[*]} (or install them yourself)" >&2
  exit 1
fi
echo "[images] apt-get install ${missing[*]}"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null

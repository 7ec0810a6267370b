#!/bin/sh
# Install the Debian tools the tests drive, only those missing (keeps `make test` fast).
set -eu
want="qemu-utils nbdkit libnbd-bin python3-libnbd fio xenstore-utils fuse3 fuse2fs nbd-server"
missing=""
for pkg in $want; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing="$missing $pkg"
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" != 0 ]; then
    echo "missing Debian packages:$missing — run as root or: sudo apt-get install$missing" >&2
    exit 1
fi
echo "installing Debian packages:$missing"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null

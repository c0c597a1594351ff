# scripts/lib/deps.sh: sourced by scripts/test and scripts/bench.
# install_deps: installs the Debian packages coil's build, tests and
# benchmarks need, only the missing ones (root needed to install).

# What the build needs (etcd-client compiles protobufs: protoc + headers),
# what the tests run against (etcd, iproute2, BIRD 2, ptp + host-local as
# the benchmark's baseline), jq for the scripts, fuse3 (fusermount3) for
# the power-cut tests on coil-lazyfs, and curl and openssl for the etcd
# cluster tests (TLS certificates, the JSON gateway), and prometheus for
# its promtool (scripts/validate-manifests checks the alert rules with it;
# policy-rc.d below keeps its service from starting); coreutils' base64
# and tar are always there.
PACKAGES=(protobuf-compiler libprotobuf-dev etcd-server iproute2 bird2
          containernetworking-plugins jq procps iputils-ping python3 python3-yaml
          curl openssl fuse3 prometheus)

install_deps() {
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "scripts/test: missing packages ${missing[*]}; run as root to install them" >&2
    exit 1
  fi
  echo "scripts/test: installing ${missing[*]}" >&2
  apt-get update -qq
  # policy-rc.d keeps Debian's etcd unit from grabbing port 2379: the tests
  # start their own etcd on private loopback ports.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  rm -f /usr/sbin/policy-rc.d
  trap - EXIT
fi
}

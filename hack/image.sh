#!/usr/bin/env bash
# Image tarballs without a container engine, for a cluster that imports them into containerd
# (`ctr -n k8s.io images import`) rather than pulling from a registry.
#
#   hack/image.sh hookrelay NAME:TAG BINARY OUT.tar
#       hookrelay's image as the Dockerfile's final stage lays it out: /hookrelay (BINARY, the
#       release build), glibc and libgcc with the resolver's NSS libraries, CA certificates,
#       /etc/passwd and /etc/group with the nonroot user 65532, USER 65532:65532,
#       ENTRYPOINT ["/hookrelay"], CMD ["run"]. The Dockerfile (distroless cc, nonroot) stays
#       the way users build it; this is the same layout from this machine's own libraries.
#   hack/image.sh static NAME:TAG BINARY OUT.tar [ARG...]
#       one static binary as /BINARY's name, its entrypoint, with ARGs, run as root (the test
#       cluster's sandbox pause, CoreDNS on port 53, the probe).
#
# The tar is a single-layer `docker save` archive: manifest.json, the config, layer.tar.
set -euo pipefail

log() { printf '[image] %s\n' "$*" >&2; }

# write_image NAME:TAG ROOTFS OUT.tar CONFIG_JSON: ROOTFS as the one layer of an image.
write_image() {
  local ref=$1 rootfs=$2 out=$3 config=$4 work
  work=$(mktemp -d)
  tar --numeric-owner --owner=0 --group=0 --sort=name --mtime=@0 -C "$rootfs" -cf "$work/layer.tar" .
  python3 - "$work" "$ref" "$config" <<'PY'
import hashlib, json, sys
work, ref, config = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
layer = open(f"{work}/layer.tar", "rb").read()
diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
image = {
    "architecture": "amd64",
    "os": "linux",
    "config": config,
    "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    "history": [{"created_by": "hack/image.sh"}],
}
body = json.dumps(image, sort_keys=True).encode()
name = hashlib.sha256(body).hexdigest() + ".json"
open(f"{work}/{name}", "wb").write(body)
json.dump([{"Config": name, "RepoTags": [ref], "Layers": ["layer.tar"]}],
          open(f"{work}/manifest.json", "w"))
PY
  tar --numeric-owner --owner=0 --group=0 --mtime=@0 -C "$work" -cf "$out" .
  rm -rf "$work"
  log "$ref -> $out ($(du -h "$out" | cut -f1))"
}

# The nonroot user and group of distroless images, and the resolver's configuration.
base_etc() {
  local root=$1
  # mktemp -d makes it 0700: the image's / must be open to its user.
  chmod 755 "$root"
  mkdir -p "$root/etc" "$root/tmp"
  chmod 1777 "$root/tmp"
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$root/etc/passwd"
  printf 'root:x:0:\nnonroot:x:65532:\n' >"$root/etc/group"
  printf 'hosts: files dns\n' >"$root/etc/nsswitch.conf"
}

# copy_libs ROOT BINARY: the shared libraries BINARY loads (and the resolver's NSS modules),
# at the paths this machine has them.
copy_libs() {
  local root=$1 binary=$2 lib
  {
    ldd "$binary" | awk '/=> \//{print $3} /^\s*\/lib/{print $1}'
    ls /lib/x86_64-linux-gnu/libnss_files.so.* /lib/x86_64-linux-gnu/libnss_dns.so.* \
      /lib/x86_64-linux-gnu/libresolv.so.* 2>/dev/null
  } | sort -u | while read -r lib; do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
  # The loader at the path the binary names.
  local interp
  interp=$(readelf -l "$binary" | sed -n 's/.*Requesting program interpreter: \(.*\)]/\1/p')
  if [ -n "$interp" ]; then
    mkdir -p "$root$(dirname "$interp")"
    cp -L "$interp" "$root$interp"
  fi
}

hookrelay_image() {
  local ref=$1 binary=$2 out=$3 root
  root=$(mktemp -d)
  base_etc "$root"
  # Stripped, as the image needs no symbols (the release build keeps them for backtraces).
  strip --strip-unneeded -o "$root/hookrelay" "$binary"
  chmod 755 "$root/hookrelay"
  copy_libs "$root" "$binary"
  mkdir -p "$root/etc/ssl/certs"
  cp -L /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
  write_image "$ref" "$root" "$out" \
    '{"User":"65532:65532","Entrypoint":["/hookrelay"],"Cmd":["run"],"ExposedPorts":{"8080/tcp":{},"9090/tcp":{}},"Env":["SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"]}'
  rm -rf "$root"
}

static_image() {
  local ref=$1 binary=$2 out=$3 root name args
  shift 3
  root=$(mktemp -d)
  base_etc "$root"
  name=$(basename "$binary")
  cp "$binary" "$root/$name"
  args=$(python3 -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$@")
  write_image "$ref" "$root" "$out" \
    "{\"Entrypoint\":[\"/$name\"],\"Cmd\":$args,\"Env\":[\"PATH=/\"]}"
  rm -rf "$root"
}

case "${1:-}" in
  hookrelay) hookrelay_image "${2:?NAME:TAG}" "${3:?BINARY}" "${4:?OUT.tar}" ;;
  static) static_image "${2:?NAME:TAG}" "${3:?BINARY}" "${4:?OUT.tar}" "${@:5}" ;;
  *) echo "usage: $0 {hookrelay|static} NAME:TAG BINARY OUT.tar [ARG...]" >&2; exit 2 ;;
esac

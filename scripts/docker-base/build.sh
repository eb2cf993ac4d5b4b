#!/usr/bin/env bash
# Makes local stand-ins for the public images the Docker path uses, for machines where no container registry
# answers (scripts/compose-test.sh calls it only then, and only for the tags missing from the engine):
#
#   usage: scripts/docker-base/build.sh IMAGE[:TAG] ...
#
#   debian:12.*            Debian bookworm, `mmdebstrap --variant=minbase` from Debian's archive, `docker import`ed
#   rust:*                 the Debian stand-in + gcc + this machine's Rust toolchain (must be the tag's version)
#   nginx:*                Debian's nginx + the official image's template rendering (nginx.Dockerfile)
#   */nginx-prometheus-exporter:*   Debian's prometheus-nginx-exporter (exporter.Dockerfile)
#   */locust:*             Locust of the tag's version from PyPI (locust.Dockerfile)
#   nats:*                 Debian's nats-server, when it is the tag's version (nats.Dockerfile)
#
# Every stand-in is labelled fanout-stack.stand-in=true, so that `docker image inspect` tells it from the real
# image, and fanout-stack.stand-in.recipe=<digest of its Dockerfile and the files it copies>: a stand-in made from
# an older recipe is made again (a real image, pulled, is always kept). Each carries this machine's extra CA
# certificates (/usr/local/share/ca-certificates, the ones update-ca-certificates adds): where registries and
# archives are reached through an intercepting proxy, cargo and pip in a container need them for TLS. The Debian stand-in is made first when another one needs it.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
label=fanout-stack.stand-in=true
# The Debian image every other stand-in starts from: the Dockerfile's RUNTIME_IMAGE.
base=$(sed -n 's/^ARG RUNTIME_IMAGE=//p' "$root/Dockerfile")
[ -n "$base" ] || { echo "docker-base: no ARG RUNTIME_IMAGE in the Dockerfile" >&2; exit 1; }

# The files a stand-in is made from; their digest is the recipe label. The Debian one is made by this script alone.
recipe_files() {
  case "$1" in
    debian:*) echo "$here/build.sh" ;;
    rust:*) echo "$here/rust.Dockerfile" ;;
    nginx:*) echo "$here/nginx.Dockerfile $here/nginx-entrypoint.sh" ;;
    */nginx-prometheus-exporter:*) echo "$here/exporter.Dockerfile" ;;
    */locust:*) echo "$here/locust.Dockerfile" ;;
    nats:*) echo "$here/nats.Dockerfile" ;;
  esac
}
recipe() {
  # shellcheck disable=SC2046 # a list of paths without spaces
  cat $(recipe_files "$1") | sha256sum | cut -c1-16
}
# An image under that tag that is real (pulled) or a stand-in of the current recipe. The Debian stand-in counts
# whatever its recipe: the others are built on it, and remaking it would remake them all.
have() {
  local labels
  labels=$(docker image inspect -f '{{index .Config.Labels "fanout-stack.stand-in"}} {{index .Config.Labels "fanout-stack.stand-in.recipe"}}' "$1" 2>/dev/null) || return 1
  case "$1" in debian:*) return 0 ;; esac
  [ "${labels%% *}" != true ] || [ "${labels#* }" = "$(recipe "$1")" ]
}

make_debian() {
  local tag=$1
  case "$tag" in debian:12*|debian:bookworm*) ;; *) echo "docker-base: no stand-in for $tag (bookworm only)" >&2; exit 1 ;; esac
  if ! command -v mmdebstrap >/dev/null; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mmdebstrap; } \
      >/tmp/docker-base-apt.log 2>&1 || { tail -20 /tmp/docker-base-apt.log >&2; exit 1; }
  fi
  local mirror=http://deb.debian.org/debian
  # Like the official slim image: no manuals, documentation (copyright files kept) or translations; no apt lists;
  # apt keeps neither its package caches (*.bin, 80 MB in every layer that runs apt-get update) nor the .debs.
  mmdebstrap --variant=minbase --quiet \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --customize-hook='mkdir -p "$1/usr/local/share/ca-certificates"' \
    --customize-hook='for c in /usr/local/share/ca-certificates/*.crt; do [ -e "$c" ] && cp "$c" "$1/usr/local/share/ca-certificates/"; done; true' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
    --customize-hook='printf "%s\n" "Dir::Cache::pkgcache \"\";" "Dir::Cache::srcpkgcache \"\";" \
      "APT::Keep-Downloaded-Packages \"false\";" >"$1/etc/apt/apt.conf.d/90no-caches"' \
    bookworm - "deb $mirror bookworm main" "deb $mirror bookworm-updates main" \
    "deb http://deb.debian.org/debian-security bookworm-security main" \
    | docker import --change 'CMD ["bash"]' --change "LABEL $label" \
      --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' - "$tag" >/dev/null
}

make_rust() {
  local tag=$1 want have_version sysroot ctx
  want=$(printf '%s' "${tag#*:}" | sed -n 's/^\([0-9][0-9.]*[0-9]\).*/\1/p')
  have_version=$(rustc --version | awk '{print $2}')
  case "$have_version" in
    "$want"|"$want".*) ;;
    *) echo "docker-base: $tag needs Rust $want on this machine, rustc is $have_version" >&2; exit 1 ;;
  esac
  sysroot=$(rustc --print sysroot)
  ctx=$(mktemp -d)
  # The toolchain without its documentation: rustc, cargo, rustdoc, the LLVM and driver libraries, the standard
  # library and rust-lld (lib/rustlib).
  mkdir -p "$ctx/toolchain/bin"
  cp -a "$sysroot/lib" "$ctx/toolchain/"
  cp -a "$sysroot/bin/rustc" "$sysroot/bin/cargo" "$sysroot/bin/rustdoc" "$ctx/toolchain/bin/"
  cp "$here/rust.Dockerfile" "$ctx/Dockerfile"
  DOCKER_BUILDKIT=0 docker build -q --label "$label" --label "fanout-stack.stand-in.recipe=$(recipe "$tag")" \
    --build-arg "BASE_IMAGE=$base" -t "$tag" "$ctx" >/dev/null \
    || { rm -rf "$ctx"; return 1; }
  rm -rf "$ctx"
}

make_from() {
  local tag=$1 dockerfile=$2
  shift 2
  DOCKER_BUILDKIT=0 docker build -q --label "$label" --label "fanout-stack.stand-in.recipe=$(recipe "$tag")" \
    --build-arg "BASE_IMAGE=$base" "$@" -f "$here/$dockerfile" -t "$tag" "$here" >/dev/null
}

[ $# -gt 0 ] || { echo "usage: $0 IMAGE[:TAG] ..." >&2; exit 2; }
if ! have "$base"; then
  for want in "$@"; do
    [ "$want" = "$base" ] && continue
    echo "docker-base: $base (needed by the other stand-ins)"
    make_debian "$base"
    break
  done
fi
for image in "$@"; do
  have "$image" && { echo "docker-base: $image is there"; continue; }
  docker image inspect "$image" >/dev/null 2>&1 && echo "docker-base: $image is a stand-in of an older recipe: made again"
  started=$(date +%s)
  case "$image" in
    debian:*) make_debian "$image" ;;
    rust:*) make_rust "$image" ;;
    nginx:*) make_from "$image" nginx.Dockerfile ;;
    */nginx-prometheus-exporter:*) make_from "$image" exporter.Dockerfile ;;
    */locust:*) make_from "$image" locust.Dockerfile --build-arg "LOCUST_VERSION=${image##*:}" ;;
    nats:*) v=${image##*:} && make_from "$image" nats.Dockerfile --build-arg "NATS_VERSION=${v%%-*}" ;;
    *) echo "docker-base: no stand-in recipe for $image" >&2; exit 1 ;;
  esac
  echo "docker-base: $image made in $(($(date +%s) - started)) s ($(docker image inspect -f '{{.Size}}' "$image" | awk '{printf "%d MB", $1/1e6}'))"
done

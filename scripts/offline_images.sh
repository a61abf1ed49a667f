#!/usr/bin/env bash
# Makes what the offline image build and scripts/e2e_compose.sh need where no image registry answers:
#   lcs-base        bookworm minbase + python3/python3-venv (debootstrap)   -> BASE_IMAGE=lcs-base
#   lcs-prometheus  bookworm minbase + Debian's prometheus package          -> PROMETHEUS_IMAGE=lcs-prometheus
#   deploy/docker/wheels/*.whl  the runtime wheels for Python 3.11 x86_64   -> WHEELS=deploy/docker/wheels
# Needs root, debootstrap, a Docker engine, a Debian mirror and a package index (pip's own configuration).
# Usage: scripts/offline_images.sh [base] [prometheus] [wheels]   (default: all three; existing images are
# kept, and a wheel directory while it resolves pyproject.toml alone, which only a Python 3.11 x86_64 host
# can tell; FORCE=1 remakes them)
# Environment: MIRROR (default: the first mirror in apt's sources), SUITE (bookworm), WORKDIR (rootfs and
# the shared .deb cache, default /var/tmp/lcs-offline), PIP (default .venv/bin/pip, else pip3).
set -euo pipefail
cd "$(dirname "$0")/.."

suite=${SUITE:-bookworm}
work=${WORKDIR:-/var/tmp/lcs-offline}
wheels=deploy/docker/wheels
pip=${PIP:-$([[ -x .venv/bin/pip ]] && echo .venv/bin/pip || echo pip3)}
read -r -a steps <<< "${*:-base prometheus wheels}"

say() { printf 'offline: %s\n' "$*"; }

# the mirror apt uses here for $suite (deb822 .sources or one-line .list entries), else deb.debian.org
mirror() {
  [[ -n ${MIRROR:-} ]] && { echo "$MIRROR"; return; }
  python3 - "$suite" <<'PY'
import glob, re, sys
suite = sys.argv[1]
for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    for stanza in open(path).read().split("\n\n"):
        f = dict(re.findall(r"^([\w-]+):[ \t]*(.*)$", stanza, re.M))
        if "deb" in f.get("Types", "").split() and suite in f.get("Suites", "").split():
            sys.exit(print(f["URIs"].split()[0]))
for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
    for line in open(path) if glob.glob(path) else []:
        m = re.match(r"deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", line)
        if m and m.group(2) == suite:
            sys.exit(print(m.group(1)))
print("http://deb.debian.org/debian")
PY
}

have_image() { [[ -z ${FORCE:-} ]] && docker image inspect "$1" >/dev/null 2>&1; }

# rootfs NAME PACKAGES: a minbase tree in $work/NAME, trimmed of apt lists, caches and docs
rootfs() {
  local dir=$work/$1
  rm -rf "$dir"
  mkdir -p "$work/debs"
  say "debootstrap $suite ($2) from $(mirror) into $dir"
  debootstrap --variant=minbase --include="$2" --cache-dir="$work/debs" "$suite" "$dir" "$(mirror)" \
    >"$work/$1.log" 2>&1 || { tail -n 30 "$work/$1.log"; exit 1; }
  rm -rf "$dir"/var/lib/apt/lists/* "$dir"/var/cache/apt/*.bin "$dir"/var/cache/apt/archives/*.deb \
    "$dir"/usr/share/doc/* "$dir"/usr/share/man/* "$dir"/usr/share/info/*
}

base() {
  have_image lcs-base && { say "lcs-base exists (FORCE=1 remakes it)"; return; }
  # no python3-pip: the Dockerfile installs with the venv's own pip (ensurepip, from python3-venv)
  rootfs lcs-base python3,python3-venv
  tar -C "$work/lcs-base" -c . | docker import --change 'CMD ["python3"]' - lcs-base
  rm -rf "$work/lcs-base"
}

prometheus() {
  have_image lcs-prometheus && { say "lcs-prometheus exists (FORCE=1 remakes it)"; return; }
  rootfs lcs-prometheus prometheus
  local dir=$work/lcs-prometheus user
  user=$(awk -F: '$1 == "prometheus" {print $3 ":" $4}' "$dir/etc/passwd")
  # like prom/prometheus: the binary as entrypoint (compose passes flags as the command), a writable
  # /prometheus for the TSDB volume, a non-root user
  mkdir -p "$dir/prometheus"
  chown "$user" "$dir/prometheus"
  tar -C "$dir" -c . | docker import \
    --change 'ENTRYPOINT ["/usr/bin/prometheus"]' \
    --change 'CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]' \
    --change "USER $user" --change 'WORKDIR /prometheus' --change 'EXPOSE 9090' \
    - lcs-prometheus
  rm -rf "$dir"
}

wheels() {
  # the image's Python is bookworm's 3.11 on x86_64: download on a host with the same, binary wheels only
  python3 -c 'import sys, platform; assert sys.version_info[:2] == (3, 11) and platform.machine() == "x86_64"' \
    || { say "pip download needs Python 3.11 on x86_64 here (the image's)"; exit 1; }
  local req
  req=$(mktemp)
  # the dependencies and the build backend (pip builds /src in the image from these wheels alone)
  python3 -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))
print("\n".join(p["project"]["dependencies"] + p["build-system"]["requires"]))' >"$req"
  # existing wheels are kept only while they still resolve every requirement on their own at the versions of
  # constraints.txt, as the image's `pip install --no-index -c constraints.txt` will (a dependency added to
  # pyproject.toml, or a version changed in constraints.txt, since they were downloaded would fail the
  # build); no pip configuration here, so that no other wheel directory or index fills the gaps
  if [[ -z ${FORCE:-} ]] && ls "$wheels"/*.whl >/dev/null 2>&1; then
    if PIP_CONFIG_FILE=/dev/null "$pip" --isolated install -q --dry-run --ignore-installed --no-index \
      --only-binary=:all: --find-links "$wheels" -r "$req" -c constraints.txt >/dev/null 2>&1; then
      rm -f "$req"
      say "$wheels already holds every wheel pyproject.toml needs (FORCE=1 downloads again)"; return
    fi
    say "$wheels lacks wheels pyproject.toml now needs: downloading the missing ones"
  fi
  say "pip download into $wheels"
  "$pip" download --only-binary=:all: -d "$wheels" -r "$req" -c constraints.txt  # the versions the image installs
  rm -f "$req"
}

for step in "${steps[@]}"; do
  case $step in
    base | prometheus | wheels) "$step" ;;
    *) say "unknown step $step (base, prometheus, wheels)"; exit 2 ;;
  esac
done
docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E '^lcs-(base|prometheus):' || true
say "done"

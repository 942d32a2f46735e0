#!/usr/bin/env bash
# Installs what jai needs to build, test and run its lab on Debian 12, from
# Debian's own packages, then checks that what is installed does what the build
# and the lab rely on (not merely that a command of that name exists).
# Idempotent: prints nothing and changes nothing when all is there.
# A missing piece it cannot install is one line on stderr and exit 1.
set -euo pipefail

fail() { echo "setup: $*" >&2; exit 1; }

# Each required capability: the package that provides it and a check that
# passes only when it is there. Checks are cheap (no network, no build).
declare -A check=(
    [postgresql-15]='[ -x /usr/lib/postgresql/15/bin/postgres ] && [ -x /usr/lib/postgresql/15/bin/pg_rewind ]'
    [postgresql-client-15]='command -v psql'
    [etcd-server]='command -v etcd'
    [haproxy]='command -v haproxy'
    # Backups: WAL archive, scheduled backups, restore drills (docs/backups.md).
    [pgbackrest]='command -v pgbackrest'
    [protobuf-compiler]='command -v protoc'
    # etcd-client's build compiles protos that import the well-known types.
    [libprotobuf-dev]='[ -f /usr/include/google/protobuf/descriptor.proto ]'
    # Crates that build C (ring, the -sys crates) and the linker.
    [gcc]='command -v cc'
    [libc6-dev]='[ -f /usr/include/stdio.h ]'
    [pkg-config]='command -v pkg-config'
    # The tests cut nodes off etcd with firewall rules on loopback.
    [iptables]='command -v iptables'
    # The app's browser test (headless) and its benchmark (make bench-app).
    [chromium]='command -v chromium'
    [wrk]='command -v wrk'
    [ca-certificates]='[ -d /etc/ssl/certs ] && ls /etc/ssl/certs | grep -q .'
    [make]='command -v make'
)

if ! command -v cargo >/dev/null 2>&1; then
    fail "cargo not found: install a Rust toolchain (https://rustup.rs) first, then run this again"
fi

missing=()
for pkg in "${!check[@]}"; do
    bash -c "${check[$pkg]}" >/dev/null 2>&1 || missing+=("$pkg")
done

if [ ${#missing[@]} -gt 0 ]; then
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 || fail "need root or sudo to install: ${missing[*]}"
        sudo="sudo"
    fi
    echo "setup: installing ${missing[*]}"
    $sudo apt-get update -qq || fail "apt-get update failed: check /etc/apt/sources.list* and the network"
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
        || fail "apt-get install ${missing[*]} failed (see apt's message above)"
    # A package that installed but still fails its check is named, not ignored.
    for pkg in "${missing[@]}"; do
        bash -c "${check[$pkg]}" >/dev/null 2>&1 || fail "$pkg is installed but its check failed: ${check[$pkg]}"
    done
fi

# --- What the build and the lab rely on, checked by use ---------------------

# protoc must compile a file that imports a well-known type, as etcd-client's
# build script does; otherwise the build stops minutes later with
# "google/protobuf/descriptor.proto: File not found".
probe_dir=$(mktemp -d)
trap 'rm -rf "$probe_dir"' EXIT
cat >"$probe_dir/probe.proto" <<'EOF'
syntax = "proto3";
import "google/protobuf/descriptor.proto";
message Probe { google.protobuf.FileDescriptorProto file = 1; }
EOF
protoc -I"$probe_dir" --descriptor_set_out="$probe_dir/probe.pb" "$probe_dir/probe.proto" >/dev/null 2>&1 \
    || fail "protoc cannot compile a file importing google/protobuf/descriptor.proto: install libprotobuf-dev"

# The lab passes etcd 3.4's flags (`--logger zap`) and its timings rely on
# 3.4's lease behaviour (minimum TTL, 500 ms expiry sweep: docs/lab.md).
etcd_version=$(etcd --version 2>/dev/null | sed -n 's/^etcd Version: //p')
case "$etcd_version" in
    3.4.*) ;;
    *) fail "etcd ${etcd_version:-of unknown version} found at $(command -v etcd); the lab needs etcd 3.4 (Debian 12's etcd-server)" ;;
esac

# The runtime API verbs the agent uses (add server, dynamic servers) came in 2.6.
haproxy_version=$(haproxy -v 2>/dev/null | sed -n 's/^HAProxy version \([0-9]*\.[0-9]*\).*/\1/p' | head -1)
haproxy_major=${haproxy_version%%.*}
haproxy_minor=${haproxy_version#*.}
if [ -z "$haproxy_version" ] || [ "$haproxy_major" -lt 2 ] || { [ "$haproxy_major" -eq 2 ] && [ "$haproxy_minor" -lt 6 ]; }; then
    fail "HAProxy ${haproxy_version:-of unknown version} found at $(command -v haproxy); the agent needs HAProxy >= 2.6 (runtime 'add server')"
fi

# The agents render pgBackRest 2.x's options (repo1-*, pg1-*, compress-type=zst)
# and read its JSON and its `verify` lines as 2.45 prints them (Debian 12's).
pgbackrest_version=$(pgbackrest version 2>/dev/null | sed -n 's/^pgBackRest \([0-9]*\.[0-9]*\).*/\1/p' | head -1)
pgbackrest_major=${pgbackrest_version%%.*}
pgbackrest_minor=${pgbackrest_version#*.}
if [ -z "$pgbackrest_version" ] || [ "$pgbackrest_major" -ne 2 ] || [ "$pgbackrest_minor" -lt 45 ]; then
    fail "pgBackRest ${pgbackrest_version:-of unknown version} found at $(command -v pgbackrest); the agents need pgBackRest 2.x, at least 2.45 (Debian 12's pgbackrest)"
fi

pg_version=$(/usr/lib/postgresql/15/bin/postgres --version 2>/dev/null | sed -n 's/^postgres (PostgreSQL) \([0-9]*\).*/\1/p')
[ "$pg_version" = 15 ] || fail "/usr/lib/postgresql/15/bin/postgres reports version '${pg_version:-?}'; the lab needs PostgreSQL 15"

# make test runs cargo fmt and cargo clippy.
cargo fmt --version >/dev/null 2>&1 || fail "cargo fmt is missing: rustup component add rustfmt"
cargo clippy --version >/dev/null 2>&1 || fail "cargo clippy is missing: rustup component add clippy"

# The lab runs PostgreSQL as this unprivileged user when started as root.
if [ "$(id -u)" -eq 0 ] && ! id postgres >/dev/null 2>&1; then
    fail "the postgres OS user is missing (it comes with postgresql-15: apt-get install --reinstall postgresql-common)"
fi

#!/usr/bin/env bash
# Installs what jai needs to build and run its lab on Debian 12, from Debian's
# own packages. Idempotent: prints nothing and changes nothing when all is there.
set -euo pipefail

missing=()
[ -x /usr/lib/postgresql/15/bin/postgres ] || missing+=(postgresql-15)
command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
command -v psql >/dev/null 2>&1 || missing+=(postgresql-client-15)
# The tests cut nodes off etcd with firewall rules on loopback.
command -v iptables >/dev/null 2>&1 || missing+=(iptables)
# The app's browser test (headless) and its benchmark (make bench-app).
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)

if ! command -v cargo >/dev/null 2>&1; then
    echo "setup: cargo not found: install a Rust toolchain (rustup) first" >&2
    exit 1
fi

if [ ${#missing[@]} -gt 0 ]; then
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 || { echo "setup: need root or sudo to install: ${missing[*]}" >&2; exit 1; }
        sudo="sudo"
    fi
    echo "setup: installing ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The lab runs PostgreSQL as this unprivileged user when started as root.
if [ "$(id -u)" -eq 0 ] && ! id postgres >/dev/null 2>&1; then
    echo "setup: the postgres OS user is missing (it comes with postgresql-15)" >&2
    exit 1
fi

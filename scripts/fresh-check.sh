#!/usr/bin/env bash
# make fresh-check: proves that a fresh Debian 12 machine with a Rust toolchain
# runs scripts/setup.sh, builds the workspace and starts the demo lab.
#
# The "fresh machine" is a minimal Debian 12 root made by debootstrap
# (--variant=minbase) in a throwaway directory, entered with chroot inside a
# private mount namespace (unshare), so every mount vanishes with the run. The
# root gets nothing of the host but the contract's Rust toolchain (the host's
# rustup home and ~/.cargo/bin, bind-mounted read-only), resolv.conf, /etc/hosts
# and a copy of the working tree (tracked and untracked, not ignored, files:
# uncommitted changes are tested; target/ is not copied). Inside it, as root:
# scripts/setup.sh, cargo build --workspace --locked, make demo, jaictl status,
# make demo-down. Each phase prints its duration; a failure names its phase and
# exits 1. The chroot shares the host's network (the lab binds 127.X.Y.1 only)
# and its package services are not started (policy-rc.d), as in any chroot.
#
# Needs root (debootstrap, mount, chroot). Environment:
#   FRESH_ROOT_DIR  where the throwaway directory jai-fresh-check.XXXXXX is
#                   made (default /var/tmp); it is removed at the end
#   FRESH_CACHE     a tarball of the pristine debootstrapped root, reused across
#                   runs and extracted anew each run (default
#                   /var/tmp/jai-fresh-root-bookworm.tar; empty: no cache;
#                   delete the file to debootstrap again)
set -euo pipefail

MIRROR=http://deb.debian.org/debian
SECURITY_MIRROR=http://deb.debian.org/debian-security
SUITE=bookworm
LAB_DIR=/tmp/jai-fresh-demo
IN_ROOT_PATH=/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

say() { echo "fresh-check: $*"; }
die() { echo "fresh-check: $*" >&2; exit 1; }

# --- Phases: each prints its duration; a failure names the phase -------------

current_phase=""
phase_start=0

# run_phase NAME COMMAND...: runs COMMAND as the phase NAME. With set -e a
# failing command exits the script, and the EXIT trap names the phase.
run_phase() {
    current_phase=$1
    shift
    phase_start=$SECONDS
    say "== $current_phase"
    "$@"
    local took=$((SECONDS - phase_start))
    say "== $current_phase: ok (${took} s)"
    printf '%s\t%s\n' "$current_phase" "$took" >>"$FC_WORK/timings"
    current_phase=""
}

report_failure() {
    local rc=$1
    if [ "$rc" -ne 0 ] && [ -n "$current_phase" ]; then
        echo "fresh-check: FAILED in phase '$current_phase' after $((SECONDS - phase_start)) s (exit $rc)" >&2
    fi
}

# --- Inside the private mount namespace (the second half of this script) -----

# in_root SCRIPT: runs SCRIPT with bash in the fresh root, as root, in /src,
# with a clean environment holding only what a fresh machine's shell would.
in_root() {
    local env=(
        HOME=/root USER=root LOGNAME=root LANG=C.UTF-8 TERM="${TERM:-dumb}"
        PATH="$IN_ROOT_PATH" RUSTUP_HOME=/root/.rustup CARGO_HOME=/root/.cargo
        CARGO_TARGET_DIR=/src/target
    )
    if [ -n "${CARGO_BUILD_JOBS:-}" ]; then env+=(CARGO_BUILD_JOBS="$CARGO_BUILD_JOBS"); fi
    env -i "${env[@]}" /usr/sbin/chroot "$FC_ROOT" /bin/bash -c "cd /src && $1"
}

mount_root() {
    local root=$FC_ROOT
    mount -t proc proc "$root/proc"
    mount --rbind /dev "$root/dev" # with /dev/pts and /dev/shm (PostgreSQL's shared memory)
    mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$root/sys"
    mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$root/tmp"
    # The contract's Rust toolchain, where rustup puts it on a fresh machine.
    mount --bind -o ro "$FC_RUSTUP_HOME" "$root/root/.rustup"
    mount --bind -o ro "$FC_CARGO_BIN" "$root/root/.cargo/bin"
    if [ -n "$FC_REGISTRY" ]; then
        mount --bind "$FC_REGISTRY" "$root/root/.cargo/registry"
    fi
}

toolchain_answers() {
    in_root 'cargo --version && rustc --version && cargo fmt --version && cargo clippy --version'
}

setup_again_is_silent() {
    local out
    out=$(in_root 'scripts/setup.sh' 2>&1)
    if [ -n "$out" ]; then
        printf '%s\n' "$out" >&2
        die "a second scripts/setup.sh printed the above; it must print nothing when all is there"
    fi
}

demo_answers() {
    in_root "\"\$CARGO_TARGET_DIR/debug/jaictl\" -c $LAB_DIR/jaictl.yaml status"
}

demo_started=0

inside_exit() {
    local rc=$?
    report_failure "$rc"
    if [ "$rc" -ne 0 ] && [ "$demo_started" -eq 1 ]; then
        say "stopping the demo after the failure"
        in_root "make demo-down LAB_DIR=$LAB_DIR" >/dev/null 2>&1 || true
    fi
    exit "$rc"
}

inside() {
    trap inside_exit EXIT
    echo $$ >"$FC_WORK/inner.pid"
    run_phase "mount /proc /dev /sys /tmp and the toolchain" mount_root
    run_phase "toolchain answers in the root" toolchain_answers
    run_phase "scripts/setup.sh" in_root 'scripts/setup.sh'
    run_phase "scripts/setup.sh again (silent)" setup_again_is_silent
    run_phase "cargo build --workspace --locked" in_root 'cargo build --workspace --locked'
    demo_started=1
    run_phase "make demo" in_root "make demo LAB_DIR=$LAB_DIR"
    run_phase "jaictl status" demo_answers
    run_phase "make demo-down" in_root "make demo-down LAB_DIR=$LAB_DIR"
    demo_started=0
}

if [ "${1:-}" = --inside ]; then
    inside
    exit 0
fi

# --- On the host ---------------------------------------------------------------

[ "$(id -u)" -eq 0 ] || die "needs root (debootstrap, mount, chroot): run it as root"
[ -r /etc/debian_version ] || die "needs a Debian host (apt-get, debootstrap)"

repo=$(git -C "$(dirname "${BASH_SOURCE[0]}")/.." rev-parse --show-toplevel) \
    || die "cannot find the git work tree around $0"
self="$repo/scripts/fresh-check.sh"

# The host's rustup toolchain: the rustup home and the proxies in ~/.cargo/bin.
command -v rustup >/dev/null 2>&1 || die "needs the Rust toolchain installed by rustup (rustup not in PATH)"
host_cargo=$(rustup which cargo 2>/dev/null) || die "rustup which cargo failed: no default toolchain?"
FC_RUSTUP_HOME=${RUSTUP_HOME:-$HOME/.rustup}
case "$host_cargo" in
    "$FC_RUSTUP_HOME"/*) ;;
    *) die "rustup's cargo ($host_cargo) is not under the rustup home $FC_RUSTUP_HOME: set RUSTUP_HOME" ;;
esac
FC_CARGO_BIN=$(dirname "$(command -v cargo)")
[ -x "$FC_CARGO_BIN/cargo" ] || die "no cargo in $FC_CARGO_BIN"
# Crates already downloaded on the host are shared (read-write, cargo locks it).
FC_REGISTRY=""
if [ -d "${CARGO_HOME:-$HOME/.cargo}/registry" ]; then
    FC_REGISTRY=${CARGO_HOME:-$HOME/.cargo}/registry
fi

cache=${FRESH_CACHE-/var/tmp/jai-fresh-root-bookworm.tar}
parent=${FRESH_ROOT_DIR:-/var/tmp}
mkdir -p "$parent"
FC_WORK=$(mktemp -d "$parent/jai-fresh-check.XXXXXX")
FC_ROOT=$FC_WORK/root
export FC_WORK FC_ROOT FC_RUSTUP_HOME FC_CARGO_BIN FC_REGISTRY
inner_pid=""
started=$SECONDS

# Processes whose root directory is the fresh root (the build, the lab's
# daemons after a failure): found by their /proc/PID/root, ended by PID, TERM
# first, KILL after 10 s.
kill_root_processes() {
    local root=$1 p pids=() round
    [ -d "$root" ] || return 0
    for round in 1 2 3 4 5 6 7 8 9 10 11; do
        pids=()
        for p in /proc/[0-9]*; do
            if [ "$p/root" -ef "$root" ]; then pids+=("${p#/proc/}"); fi
        done 2>/dev/null
        [ ${#pids[@]} -gt 0 ] || return 0
        if [ "$round" -eq 1 ]; then say "ending process(es) left in the fresh root: ${pids[*]}"; fi
        if [ "$round" -lt 11 ]; then
            kill -TERM "${pids[@]}" 2>/dev/null || true
        else
            kill -KILL "${pids[@]}" 2>/dev/null || true
        fi
        sleep 1
    done
}

# Safe to run twice: the second call finds nothing to do. The mounts live only
# in the child's namespace, so from here the root is plain files; rm stays on
# one file system all the same.
cleanup() {
    local i
    if [ -n "$inner_pid" ] && kill -0 "$inner_pid" 2>/dev/null; then
        # Interrupted: unshare ignores TERM and the inner script waits for the
        # command it runs in the root, so end what runs in the root; the inner
        # script then fails (and stops a started demo), and unshare exits.
        kill_root_processes "$FC_ROOT"
        for i in $(seq 60); do
            kill -0 "$inner_pid" 2>/dev/null || break
            if [ "$i" -eq 60 ] && [ -s "$FC_WORK/inner.pid" ]; then
                kill -KILL "$(cat "$FC_WORK/inner.pid")" 2>/dev/null || true
            fi
            sleep 1
        done
        wait "$inner_pid" 2>/dev/null || true
    fi
    inner_pid=""
    if [ -n "${FC_WORK:-}" ] && [ -d "$FC_WORK" ]; then
        kill_root_processes "$FC_ROOT"
        rm -rf --one-file-system "$FC_WORK"
    fi
    FC_WORK=""
}

outside_exit() {
    local rc=$?
    report_failure "$rc"
    cleanup
    exit "$rc"
}
trap outside_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

install_debootstrap() {
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
}

make_root() {
    mkdir "$FC_ROOT"
    debootstrap --variant=minbase "$SUITE" "$FC_ROOT" "$MIRROR"
    if [ -n "$cache" ]; then
        # Pristine: nothing has run in it yet. Written aside, then renamed, so a
        # concurrent or interrupted run never sees half a tarball.
        tar -C "$FC_ROOT" --numeric-owner -cpf "$cache.$$.tmp" .
        mv "$cache.$$.tmp" "$cache"
    fi
}

unpack_root() {
    mkdir "$FC_ROOT"
    tar -C "$FC_ROOT" --numeric-owner -xpf "$cache"
}

# A copy of the working tree: tracked files as they are now (uncommitted
# changes included, deleted ones skipped) and untracked files not ignored.
copy_project() {
    mkdir "$FC_ROOT/src"
    local f
    git -C "$repo" ls-files -z --cached --others --exclude-standard \
        | while IFS= read -r -d '' f; do
            if [ -e "$repo/$f" ] || [ -L "$repo/$f" ]; then printf '%s\0' "$f"; fi
        done \
        | sort -zu \
        | tar -C "$repo" --null --no-recursion -T - -cf - \
        | tar -C "$FC_ROOT/src" -xpf -
}

prepare_root() {
    local root=$FC_ROOT
    # The host's suites: bookworm, bookworm-updates, bookworm-security.
    rm -f "$root/etc/apt/sources.list"
    cat >"$root/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $SECURITY_MIRROR
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    # Package scripts must not start services (PostgreSQL's main cluster on
    # 5432, etcd on 2379) in a chroot that shares the host's network.
    printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
    chmod 755 "$root/usr/sbin/policy-rc.d"
    cp -L /etc/resolv.conf "$root/etc/resolv.conf"
    cp -L /etc/hosts "$root/etc/hosts"
    mkdir -p "$root/root/.rustup" "$root/root/.cargo/bin"
    if [ -n "$FC_REGISTRY" ]; then mkdir -p "$root/root/.cargo/registry"; fi
    copy_project
}

say "fresh root in $FC_WORK (Debian $SUITE minbase from $MIRROR)"
if ! command -v debootstrap >/dev/null 2>&1; then
    run_phase "install debootstrap on the host" install_debootstrap
fi
if [ -n "$cache" ] && [ -f "$cache" ]; then
    run_phase "unpack the cached pristine root ($cache)" unpack_root
else
    run_phase "debootstrap --variant=minbase $SUITE" make_root
fi
run_phase "prepare the root (apt sources, resolv.conf, project copy in /src)" prepare_root

unshare --mount --propagation private --fork -- bash "$self" --inside &
inner_pid=$!
rc=0
wait "$inner_pid" || rc=$?
inner_pid=""

say "phases (seconds):"
while IFS=$'\t' read -r name took; do
    printf '  %5s  %s\n' "$took" "$name"
done <"$FC_WORK/timings"
if [ "$rc" -ne 0 ]; then
    die "FAILED (see the phase above); total $((SECONDS - started)) s"
fi
say "OK: a fresh Debian 12 root ran scripts/setup.sh, built jai and ran its demo; total $((SECONDS - started)) s"

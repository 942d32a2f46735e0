#!/usr/bin/env bash
# make bench-backup: how long backups, incremental backups and restore drills
# take on a 2-node lab, and how big the repository gets (docs/benchmarks.md,
# "Backups"). Numbers, not pass/fail.
#
# It starts a lab (2 nodes, no app) in BENCH_BACKUP_DIR, waits for the
# scheduled first full backup and drill to end, then measures twice: on the
# lab's small database as it starts, and after `pgbench -i -s SCALE` (scale 70
# is about 1 GB) through HAProxy's write port as the superuser, in a database
# `bench` of its own. Each time: `jaictl backup create --type full`, the
# repository's size, `jaictl backup create --type incr` after TRANSACTIONS
# small transactions, and `jaictl backup verify` (pgbackrest verify + the
# restore drill, whose "restored and recovered in X s" and RPO it prints).
# Times are wall-clock seconds of the jaictl command (request, assignment,
# pgBackRest, result in etcd). The lab is stopped at the end, also on failure
# or Ctrl-C (`jai-lab down`: by PID); its logs stay in the directory.
#
# Environment: BENCH_BACKUP_DIR (/tmp/jai-bench-backup), SCALE (70),
# TRANSACTIONS (1000), BIN_DIR (target/debug of this checkout),
# BENCH_BACKUP_TIMEOUT (a bound on each step, 30m).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=${BENCH_BACKUP_DIR:-/tmp/jai-bench-backup}
SCALE=${SCALE:-70}
TRANSACTIONS=${TRANSACTIONS:-1000}
BIN_DIR=${BIN_DIR:-${CARGO_TARGET_DIR:-$ROOT/target}/debug}
STEP_TIMEOUT=${BENCH_BACKUP_TIMEOUT:-30m}

LAB="$BIN_DIR/jai-lab"
JAICTL="$BIN_DIR/jaictl"

say() { echo "bench-backup: $*" >&2; }
die() { echo "bench-backup: $*" >&2; exit 1; }

for program in "$LAB" "$JAICTL"; do
    [ -x "$program" ] || die "$program is missing: cargo build --workspace first (make bench-backup does)"
done
for program in pgbench psql timeout du; do
    command -v "$program" >/dev/null 2>&1 || die "$program is missing (scripts/setup.sh installs it)"
done

# --- The lab --------------------------------------------------------------

if [ -f "$DIR/lab.json" ]; then
    "$LAB" down --dir "$DIR" >/dev/null 2>&1 || true
fi
lab_up=0
cleanup() {
    if [ "$lab_up" = 1 ]; then
        "$LAB" down --dir "$DIR" >/dev/null 2>&1 || echo "bench-backup: jai-lab down --dir $DIR failed" >&2
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say "starting a 2-node lab in $DIR"
lab_up=1
timeout "$STEP_TIMEOUT" "$LAB" up --dir "$DIR" --nodes 2 --no-app >"$DIR.up.log" 2>&1 \
    || { cat "$DIR.up.log" >&2; die "jai-lab up failed"; }
mv "$DIR.up.log" "$DIR/up.log"

# Connection to the write port as the superuser: a passfile of our own (0600),
# so the password is on no command line and in no environment variable.
write=$(sed -n 's/.*"write": *"\([^"]*\)".*/\1/p' "$DIR/lab.json" | head -1)
[ -n "$write" ] || die "no haproxy.write in $DIR/lab.json"
host=${write%:*}
port=${write##*:}
superuser=$(sed -n 's/.*"superuser": *"\([^"]*\)".*/\1/p' "$DIR/lab.json" | head -1)
superuser=${superuser:-postgres}
export PGPASSFILE="$DIR/bench-backup.pgpass"
(umask 077; printf '%s:%s:*:%s:%s\n' "$host" "$port" "$superuser" "$(head -1 "$DIR/secrets/superuser")" >"$PGPASSFILE")
export PGHOST=$host PGPORT=$port PGUSER=$superuser PGCONNECT_TIMEOUT=5
export LC_ALL=C

jaictl() { timeout "$STEP_TIMEOUT" "$JAICTL" -c "$DIR/jaictl.yaml" "$@"; }

# Waits until no backup job exists and a drill has run (the leader schedules a
# full backup and a drill as soon as the stanza exists).
wait_idle() {
    local deadline=$((SECONDS + 600)) text
    while :; do
        text=$(jaictl status 2>/dev/null || true)
        if ! grep -q '^Backup job:' <<<"$text" && grep -q '^Last verify: verify' <<<"$text"; then
            return 0
        fi
        [ "$SECONDS" -lt "$deadline" ] || die "a backup job still runs after 600 s: $(grep '^Backup job:\|^Last' <<<"$text")"
        sleep 1
    done
}

# Runs a jaictl backup command; prints its output to stderr, sets $took (s,
# wall clock) and $printed.
timed() {
    local start end line
    start=$(date +%s.%N)
    printed=$(jaictl "$@" --wait "$STEP_TIMEOUT" 2>&1) || { echo "$printed" >&2; die "jaictl $* failed"; }
    end=$(date +%s.%N)
    while IFS= read -r line; do echo "    $line"; done <<<"$printed" >&2
    took=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')
}

mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
repo_bytes() { du -sb "$DIR/backup/repo" | cut -f1; }
db_bytes() {
    psql -d postgres -Atc "SELECT sum(pg_database_size(datname)) FROM pg_database WHERE datallowconn"
}

# One row of results: full, repository, incremental, drill. measure NAME
# PGBENCH_ARGS...: the pgbench arguments (script, database) of the transactions
# before the incremental backup.
declare -a rows=()
measure() {
    local name=$1
    shift
    local database full_took full_stored repo incr_took incr_stored verify_took drill rpo
    wait_idle
    database=$(db_bytes)
    say "$name: full backup ($(mib "$database") of databases)"
    timed backup create --type full
    full_took=$took
    full_stored=$(sed -n 's/.*stored in the repository: //p' <<<"$printed")
    repo=$(repo_bytes)
    say "$name: $TRANSACTIONS transactions, then an incremental backup"
    timeout "$STEP_TIMEOUT" pgbench -n -c 2 -j 2 -t $((TRANSACTIONS / 2)) "$@" >/dev/null
    timed backup create --type incr
    incr_took=$took
    incr_stored=$(sed -n 's/.*stored in the repository: //p' <<<"$printed")
    say "$name: restore drill"
    timed backup verify
    verify_took=$took
    drill=$(sed -n 's/.*restored and recovered in \([0-9.]*\) s.*/\1/p' <<<"$printed")
    rpo=$(sed -n 's/.*RPO: the newest archived WAL was \([0-9.]*\) s old.*/\1/p' <<<"$printed")
    rows+=("$(printf '| %s | %s | %s s | %s | %s | %s s | %s | %s s | %s s | %s s |' \
        "$name" "$(mib "$database")" "$full_took" "$full_stored" "$(mib "$repo")" \
        "$incr_took" "$incr_stored" "$verify_took" "${drill:-?}" "${rpo:-?}")")
}

say "waiting for the scheduled first full backup and drill"
wait_idle

# The small database: a table of our own takes the transactions.
psql -d postgres -qc "CREATE TABLE IF NOT EXISTS bench_backup (id bigserial PRIMARY KEY, at timestamptz DEFAULT now())"
small_script="$DIR/bench-backup-small.sql"
echo "INSERT INTO bench_backup DEFAULT VALUES;" >"$small_script"
measure "lab database" -f "$small_script" postgres

say "loading pgbench at scale $SCALE into database bench"
PGOPTIONS="-c client_min_messages=warning" psql -d postgres -qc "DROP DATABASE IF EXISTS bench" -c "CREATE DATABASE bench"
load_start=$(date +%s)
timeout "$STEP_TIMEOUT" pgbench -i -q -s "$SCALE" bench >"$DIR/pgbench-init.log" 2>&1 \
    || { tail -5 "$DIR/pgbench-init.log" >&2; die "pgbench -i failed"; }
say "loaded in $(( $(date +%s) - load_start )) s"
measure "pgbench -s $SCALE" bench

echo
echo "| database | size | full backup | stored | repository after it | incr after $TRANSACTIONS tx | stored | verify | drill: restored and recovered | RPO |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
printf '%s\n' "${rows[@]}"

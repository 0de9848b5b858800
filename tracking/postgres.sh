#!/usr/bin/env bash
# A throwaway PostgreSQL server on 127.0.0.1, for Optuna's multi-worker storage
# (`--storage postgresql://...`, needs `pip install -e '.[postgres]'`) and for the test suite.
#
#   tracking/postgres.sh start DIR [PORT]
#       Install PostgreSQL when initdb/pg_ctl are missing (Debian: apt-get install postgresql; as
#       root, or with passwordless sudo), create a cluster for DIR, start it on 127.0.0.1:PORT
#       (default: a free port) and print its URL as the last (only) line on stdout:
#           postgresql://optuna@127.0.0.1:PORT/optuna
#       (SQLAlchemy 2.1 reads plain postgresql:// with psycopg 3: the `postgres` extra installs it)
#       Everything else goes to stderr. If DIR's cluster is already running, just print its URL;
#       if it is stopped, start it again (same data, same port unless PORT is given).
#   tracking/postgres.sh stop DIR      stop DIR's server (pg_ctl stop -m fast); no-op if not running
#   tracking/postgres.sh remove DIR    stop it and delete its data
#
#   e.g.  url=$(tracking/postgres.sh start ~/optuna-pg)
#         seg-mlops tune ... --storage "$url"     # as many workers as you like, same $url
#
# What it makes: database `optuna`, owned by the role `optuna` (not a superuser). TCP listens on
# 127.0.0.1 only, and pg_hba allows only that role/database there, with `trust` (no password) —
# so every local user of the machine can reach that database; don't put anything secret in it.
# The superuser `postgres` is reachable only through the unix socket, which lives inside the
# 0700 data directory (so only the server's OS user and root can use it). Server log:
# <data>/server.log. Durability: synchronous_commit=off (a crash may lose the last few commits,
# never corrupts).
#
# Root and permissions: PostgreSQL refuses to run as root, so as root the server runs as the
# `postgres` system user (created by the Debian package) and the data directory belongs to it;
# as any other user, the server runs as that user. The data directory is DIR/data, unless the
# server's user cannot reach DIR (as root, e.g. DIR under pytest's /tmp/pytest-of-root, which is
# 0700 root) or DIR's path is too long for the unix socket (~107 bytes): then the data lives in a
# fresh `mktemp -d /tmp/seg-mlops-pg.XXXXXX`/data and DIR/data is a symlink to it (`remove`
# deletes both; `start` also deletes such directories whose DIR is gone, e.g. pytest's old tmp
# dirs, stopping their server first). DIR's parents are never chmod-ed. On a first install the Debian package also creates its
# own `main` cluster (/etc/postgresql/*/main, port 5432), which systemd may start; this script
# does not use or touch it.
set -euo pipefail

DB=optuna
ROLE=optuna

log() { echo "postgres.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }
usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0" >&2; exit 2; }

# Our own settings only: ignore the caller's PGHOST, PGPORT, PGDATA, PGOPTIONS...
for v in $(compgen -e); do [[ $v == PG* ]] && unset "$v"; done

bindir=
find_bindir() {
  local d
  bindir=$(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V | while read -r d; do
             if [[ -x $d/initdb && -x $d/pg_ctl && -x $d/postgres ]]; then echo "$d"; fi
           done | tail -n1)
  if [[ -z $bindir ]] && command -v initdb >/dev/null && command -v pg_ctl >/dev/null; then
    bindir=$(dirname "$(command -v initdb)")
  fi
  [[ -n $bindir ]]
}

install_postgres() {
  command -v apt-get >/dev/null ||
    die "PostgreSQL (initdb, pg_ctl) not found and no apt-get: install the PostgreSQL server yourself"
  local sudo=()
  if (( EUID != 0 )); then
    if ! { command -v sudo >/dev/null && sudo -n true 2>/dev/null; }; then
      die "PostgreSQL (initdb, pg_ctl) not found; install it as root: apt-get install postgresql"
    fi
    sudo=(sudo -n)
  fi
  local install=("${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q
                 -o DPkg::Lock::Timeout=300 --no-install-recommends postgresql)
  log "PostgreSQL not found: installing the Debian package (one-off, a minute or two)"
  if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
    "${sudo[@]}" apt-get update -q -o DPkg::Lock::Timeout=300 </dev/null >&2
  fi
  if ! "${install[@]}" </dev/null >&2; then
    log "apt-get install failed: apt-get update, then retrying"
    "${sudo[@]}" apt-get update -q -o DPkg::Lock::Timeout=300 </dev/null >&2
    "${install[@]}" </dev/null >&2
  fi
  find_bindir || die "installed postgresql but found no initdb/pg_ctl under /usr/lib/postgresql/*/bin"
}

need_bindir() { find_bindir || install_postgres; }

# Run a command as the server's OS user (`owner`), from / (postgres may not reach the caller's cwd).
owner=
as_owner() {
  if (( EUID == 0 )) && [[ $owner != root ]]; then
    if command -v runuser >/dev/null; then (cd / && runuser -u "$owner" -- "$@")
    else (cd / && su -s /bin/bash "$owner" -c "$(printf '%q ' "$@")"); fi
  else
    (cd / && "$@")
  fi
}

pg() { as_owner "$bindir/$1" "${@:2}"; }

psql_bin() { if [[ -x $bindir/psql ]]; then echo "$bindir/psql"; else command -v psql || die "no psql"; fi; }

# The data directory for DIR (resolved through DIR/data when it is a symlink), or "".
data_of() {
  local link=$1/data
  [[ -e $link ]] || { echo ""; return; }
  readlink -f -- "$link"
}

running() { pg pg_ctl -D "$1" status >/dev/null 2>&1; }

port_of_running() { sed -n 4p "$1/postmaster.pid"; }

url_for() { echo "postgresql://$ROLE@127.0.0.1:$1/$DB"; }

free_port() {
  local p
  for _ in $(seq 200); do
    p=$((20000 + RANDOM % 12000))   # below Linux's ephemeral range (32768+)
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return; fi
  done
  die "found no free port"
}

write_conf() {  # data port
  as_owner tee "$1/seg-mlops.conf" >/dev/null <<EOF
# written by tracking/postgres.sh (rewritten on each start)
listen_addresses = '127.0.0.1'
port = $2
unix_socket_directories = '$1'
max_connections = 200
synchronous_commit = off
EOF
}

init_cluster() {  # data
  local data=$1
  local out
  if ! out=$(pg initdb -D "$data" -U postgres -A trust -E UTF8 --locale=C 2>&1); then
    echo "$out" >&2
    die "initdb failed in $data"
  fi
  as_owner tee -a "$data/postgresql.conf" >/dev/null <<'EOF'

include 'seg-mlops.conf'
EOF
  as_owner tee "$data/pg_hba.conf" >/dev/null <<EOF
# written by tracking/postgres.sh
# TYPE  DATABASE  USER      ADDRESS        METHOD
# unix socket: it lives in the 0700 data directory, so only the server's OS user (and root) get here
local   all       all                      trust
# TCP: loopback only, and only the $ROLE role on the $DB database
host    $DB    $ROLE    127.0.0.1/32   trust
EOF
}

start_server() {  # data [port]
  local data=$1 want=${2:-} p
  for attempt in 1 2 3 4 5; do
    p=${want:-$(free_port)}
    write_conf "$data" "$p"
    # 9>&-: the server must not inherit our lock on DIR
    if pg pg_ctl -D "$data" -l "$data/server.log" -w -t 120 start >&2 9>&-; then return 0; fi
    if [[ -z $want ]] && tail -n 20 "$data/server.log" 2>/dev/null |
         grep -qE 'could not (bind|create listen)|already in use'; then
      log "port $p was taken, trying another ($attempt/5)"
      continue
    fi
    tail -n 20 "$data/server.log" >&2 2>/dev/null || true
    die "the server in $data did not start (log: $data/server.log)"
  done
  die "could not find a free port in 5 tries"
}

ensure_db() {  # data port
  local q; q=(as_owner "$(psql_bin)" -X -q -v ON_ERROR_STOP=1 -h "$1" -p "$2" -U postgres -d postgres)
  if [[ -z $("${q[@]}" -tAc "SELECT 1 FROM pg_roles WHERE rolname = '$ROLE'") ]]; then
    "${q[@]}" -c "CREATE ROLE $ROLE LOGIN" >&2
  fi
  if [[ -z $("${q[@]}" -tAc "SELECT 1 FROM pg_database WHERE datname = '$DB'") ]]; then
    "${q[@]}" -c "CREATE DATABASE $DB OWNER $ROLE" >&2
  fi
}

lock() {  # dir: serialise concurrent runs on the same DIR
  exec 9>"$1/.postgres.sh.lock"
  if command -v flock >/dev/null; then flock 9; fi
}

# Can the server's user reach (and write into) DIR, and is the socket path short enough?
in_place_ok() {  # dir
  local dir=$1
  (( ${#dir} <= 85 )) || return 1   # + /data/.s.PGSQL.NNNNN must fit in sun_path (107 bytes)
  [[ $owner == "$(id -un)" ]] || as_owner test -x "$dir"
}

# /tmp/seg-mlops-pg.* boxes of ours whose DIR no longer links to them (DIR deleted without
# `remove`, e.g. a killed pytest session whose tmp dir pytest later cleaned): stop, delete.
collect_orphans() {
  local box dir data owner   # best effort (called with || true): a failure skips that box
  for box in /tmp/seg-mlops-pg.*; do
    [[ -O $box && -f $box/dir ]] || continue
    dir=$(<"$box/dir") || continue
    data=$box/data
    [[ $(readlink -f -- "$dir/data" 2>/dev/null) == "$data" ]] && continue
    if [[ -f $data/PG_VERSION ]]; then
      owner=$(stat -c %U "$data") || continue
      if running "$data"; then
        log "stopping the orphaned server in $data (its $dir is gone)"
        pg pg_ctl -D "$data" -m fast -w stop >&2 || continue
      fi
    fi
    log "deleting orphaned $box (its $dir is gone)"
    rm -rf -- "$box"
  done
}

cmd_start() {
  local dir=$1 port=${2:-} data
  [[ -z $port || $port =~ ^[0-9]+$ ]] || die "PORT must be a number, got '$port'"
  mkdir -p -- "$dir"
  dir=$(cd -- "$dir" && pwd -P)
  lock "$dir"
  need_bindir
  collect_orphans || true
  if (( EUID == 0 )); then
    id postgres >/dev/null 2>&1 || die "no 'postgres' system user (the Debian postgresql package makes it)"
    owner=postgres
  else
    owner=$(id -un)
  fi

  if [[ -L $dir/data && ! -e $dir/data ]]; then
    log "$dir/data points to a directory that is gone: making a new cluster"
    rm -f -- "$dir/data"
  fi
  data=$(data_of "$dir")
  if [[ -n $data && -f $data/PG_VERSION ]]; then
    (( EUID == 0 )) && owner=$(stat -c %U "$data")
    if running "$data"; then
      local p; p=$(port_of_running "$data")
      [[ -z $port || $port == "$p" ]] || log "already running on port $p (not $port)"
      ensure_db "$data" "$p"
      url_for "$p"
      return
    fi
    log "starting the existing cluster in $data"
    [[ -n $port ]] || port=$(sed -n "s/^port = \([0-9]*\)$/\1/p" "$data/seg-mlops.conf" 2>/dev/null || true)
    if [[ -n $port ]] && (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      [[ -n ${2:-} ]] && die "port $port is in use"
      port=   # its old port is taken now: pick another
    fi
  elif [[ -n $data ]] && [[ -n $(ls -A -- "$data") ]]; then
    die "$dir/data exists and is not a PostgreSQL cluster; remove it or use another DIR"
  else
    if in_place_ok "$dir"; then
      data=$dir/data
      mkdir -p -- "$data"
    else
      local box; box=$(mktemp -d /tmp/seg-mlops-pg.XXXXXX)
      chmod 755 "$box"
      data=$box/data
      mkdir -- "$data"
      log "the server's user ($owner) cannot use $dir (permissions or path length): data in $data"
      ln -sfn -- "$data" "$dir/data"
      printf '%s\n' "$dir" >"$box/dir"   # last: collect_orphans leaves boxes without it alone
    fi
    if (( EUID == 0 )); then chown "$owner:" "$data"; fi
    chmod 700 "$data"
    log "creating a cluster in $data ($("$bindir/postgres" -V), runs as $owner)"
    init_cluster "$data"
  fi
  start_server "$data" "$port"
  port=$(port_of_running "$data")
  ensure_db "$data" "$port"
  log "running on 127.0.0.1:$port (log: $data/server.log; stop: $0 stop $dir)"
  url_for "$port"
}

cmd_stop() {
  local dir=$1 data
  data=$(data_of "$dir")
  if [[ -z $data || ! -f $data/PG_VERSION ]]; then log "no cluster in $dir"; return 0; fi
  find_bindir || { log "PostgreSQL is not installed: nothing runs"; return 0; }
  owner=$(stat -c %U "$data")
  if running "$data"; then pg pg_ctl -D "$data" -m fast -w stop >&2; else log "not running"; fi
}

cmd_remove() {
  local dir=$1 data
  [[ -e $dir/data || -L $dir/data ]] || { log "no cluster in $dir"; return 0; }
  cmd_stop "$dir"
  if [[ -L $dir/data ]]; then
    data=$(readlink -- "$dir/data")
    # only what this script made: /tmp/seg-mlops-pg.*/data
    if [[ $data == /tmp/seg-mlops-pg.*/data ]]; then rm -rf -- "${data%/data}"; fi
    rm -f -- "$dir/data"
  else
    rm -rf -- "$dir/data"
  fi
  rm -f -- "$dir/.postgres.sh.lock"
}

case ${1:-} in
  start)  [[ $# -ge 2 && $# -le 3 ]] || usage; cmd_start "$2" "${3:-}" ;;
  stop)   [[ $# -eq 2 ]] || usage; cmd_stop "$2" ;;
  remove) [[ $# -eq 2 ]] || usage; cmd_remove "$2" ;;
  *) usage ;;
esac

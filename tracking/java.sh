#!/usr/bin/env bash
# A Java runtime for Apache Spark (`seg-mlops batch-infer --engine spark`), Debian's package.
#
#   tracking/java.sh        install `openjdk-17-jre-headless` when no `java` of version 17 or
#                           later is on PATH (as root, or with passwordless sudo); prints the
#                           java path as the last line
#
# Idempotent and quiet when Java is there (`make test` runs it every time). Everything but the
# last line goes to stderr. PySpark itself comes from the package's `spark` extra (setup.cfg).
set -euo pipefail

log() { echo "java.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

version() {  # major version of the java on PATH, 0 when none
  local v
  v=$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -1) || true
  echo "${v:-0}"
}

if ! command -v java >/dev/null || (( $(version) < 17 )); then
  command -v apt-get >/dev/null || die "no Java 17+ and no apt-get: install a Java 17 runtime yourself"
  sudo=()
  if (( EUID != 0 )); then
    if ! { command -v sudo >/dev/null && sudo -n true 2>/dev/null; }; then
      die "no Java 17+; install it as root: apt-get install openjdk-17-jre-headless"
    fi
    sudo=(sudo -n)
  fi
  install=("${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q
           -o DPkg::Lock::Timeout=300 --no-install-recommends openjdk-17-jre-headless)
  log "no Java 17+: installing openjdk-17-jre-headless (one-off, a minute or two)"
  if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
    "${sudo[@]}" apt-get update -q -o DPkg::Lock::Timeout=300 </dev/null >&2
  fi
  if ! "${install[@]}" </dev/null >&2; then
    log "apt-get install failed: apt-get update, then retrying"  # stale lists: a removed version
    "${sudo[@]}" apt-get update -q -o DPkg::Lock::Timeout=300 </dev/null >&2
    "${install[@]}" </dev/null >&2
  fi
  command -v java >/dev/null || die "installed openjdk-17-jre-headless but found no java on PATH"
fi
command -v java

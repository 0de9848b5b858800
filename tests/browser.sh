#!/usr/bin/env bash
# Headless Chromium + chromedriver for the browser tests (tests/test_browser.py), Debian packages.
#
#   tests/browser.sh        install `chromium` and `chromium-driver` when /usr/bin/chromium or
#                           /usr/bin/chromedriver is missing (as root, or with passwordless sudo);
#                           prints the two paths as the last line: "CHROMIUM CHROMEDRIVER"
#
# Idempotent and quiet when both are there (`make test` runs it every time). Everything but the
# last line goes to stderr. Selenium itself comes from the package's `test` extra (setup.cfg).
set -euo pipefail

log() { echo "browser.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

chromium=$(command -v chromium || true)
driver=$(command -v chromedriver || true)
if [[ -z $chromium || -z $driver ]]; then
  command -v apt-get >/dev/null ||
    die "chromium/chromedriver not found and no apt-get: install Chromium and its chromedriver yourself"
  sudo=()
  if (( EUID != 0 )); then
    if ! { command -v sudo >/dev/null && sudo -n true 2>/dev/null; }; then
      die "chromium/chromedriver not found; install them as root: apt-get install chromium chromium-driver"
    fi
    sudo=(sudo -n)
  fi
  install=("${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q
           -o DPkg::Lock::Timeout=300 --no-install-recommends chromium chromium-driver)
  log "chromium/chromedriver not found: installing the Debian packages (one-off, a minute or two)"
  if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
    "${sudo[@]}" apt-get update -q -o DPkg::Lock::Timeout=300 </dev/null >&2
  fi
  if ! "${install[@]}" </dev/null >&2; then
    log "apt-get install failed: apt-get update, then retrying"  # stale lists: a removed version
    "${sudo[@]}" apt-get update -q -o DPkg::Lock::Timeout=300 </dev/null >&2
    "${install[@]}" </dev/null >&2
  fi
  chromium=$(command -v chromium || true)
  driver=$(command -v chromedriver || true)
  [[ -n $chromium && -n $driver ]] || die "installed chromium chromium-driver but found no chromium/chromedriver"
fi
echo "$chromium $driver"

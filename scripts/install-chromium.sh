#!/bin/bash
# Debian's chromium for the browser tests (tests/common/browser.rs opens the report page in it,
# headless). Fast and silent when chromium is already there; otherwise installs it with apt-get
# (needs root; runs `apt-get update` only when the package lists do not know chromium).
# Exits non-zero, saying why, when chromium is missing and cannot be installed.
set -u
if command -v chromium >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" != 0 ]; then echo "install-chromium.sh: chromium is missing and installing it needs root" >&2; exit 1; fi
if ! command -v apt-get >/dev/null 2>&1; then echo "install-chromium.sh: chromium is missing and there is no apt-get" >&2; exit 1; fi
log=/tmp/nnflow-chromium.apt.log
export DEBIAN_FRONTEND=noninteractive
# stale package lists (a mirror that moved on) get one `apt-get update` and a second try
{
  if ! apt-cache show chromium >/dev/null 2>&1; then apt-get update -qq; fi
  apt-get install -y -qq --no-install-recommends chromium ||
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium; }
} >"$log" 2>&1 || {
  echo "install-chromium.sh: cannot install chromium (see $log)" >&2; exit 1
}
command -v chromium >/dev/null 2>&1 || { echo "install-chromium.sh: chromium installed but not on PATH" >&2; exit 1; }

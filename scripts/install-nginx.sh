#!/bin/bash
# Debian's nginx for the remote cache tests (tests/common/nginx.rs starts it, unprivileged, on
# 127.0.0.1 with its WebDAV module as the HTTP remote cache). Fast and silent when nginx is already
# there; otherwise installs it with apt-get (needs root; runs `apt-get update` only when the
# package lists do not know nginx). Exits non-zero, saying why, when nginx is missing and cannot
# be installed. Only the binary is wanted: the service the package starts is stopped again.
set -u
export PATH="$PATH:/usr/sbin:/sbin"
if command -v nginx >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" != 0 ]; then echo "install-nginx.sh: nginx is missing and installing it needs root" >&2; exit 1; fi
if ! command -v apt-get >/dev/null 2>&1; then echo "install-nginx.sh: nginx is missing and there is no apt-get" >&2; exit 1; fi
log=/tmp/nnflow-nginx.apt.log
export DEBIAN_FRONTEND=noninteractive
# stale package lists (a mirror that moved on) get one `apt-get update` and a second try
{
  if ! apt-cache show nginx >/dev/null 2>&1; then apt-get update -qq; fi
  apt-get install -y -qq --no-install-recommends nginx ||
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends nginx; }
} >"$log" 2>&1 || {
  echo "install-nginx.sh: cannot install nginx (see $log)" >&2; exit 1
}
# the package may start the system's nginx on port 80; the tests start their own
if command -v service >/dev/null 2>&1; then service nginx stop >/dev/null 2>&1 || true; fi
command -v nginx >/dev/null 2>&1 || { echo "install-nginx.sh: nginx installed but not on PATH" >&2; exit 1; }

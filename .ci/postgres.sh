#!/usr/bin/env bash
# PostgreSQL server binaries for tests/test_mlflow_server.py (the test starts its own throw-away
# cluster on loopback as the `postgres` user; nothing here starts a server). Debian/Ubuntu, as root.
# Exit 0 when the binaries are there (already, or installed now), 1 when they cannot be had here.
set -euo pipefail

have_pg() {
  compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null && id postgres >/dev/null 2>&1
}

if have_pg; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "postgres.sh: PostgreSQL is not installed and cannot be installed here (needs root and apt-get)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
# Do not let the package start its default cluster: the test runs its own on a free port.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy"
  chmod +x "$policy"
  created_policy=1
fi
trap '[ "$created_policy" = 1 ] && rm -f "$policy"' EXIT
for attempt in 1 2 3; do
  if apt-get update -qq && apt-get install -y -qq --no-install-recommends postgresql >/dev/null; then
    break
  fi
  echo "postgres.sh: apt-get failed (attempt $attempt); retrying" >&2
  sleep $((attempt * 5))
done
have_pg

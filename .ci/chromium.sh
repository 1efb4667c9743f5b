#!/usr/bin/env bash
# Chromium for the annotation app's browser tests (tests/test_feedback_app.py drives it through
# playwright with executable_path: playwright cannot download its own browser here). Debian's
# `chromium` package, as root. Exit 0 when the binary is there (already, or installed now), 1 when
# it cannot be had here.
set -euo pipefail

if command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "chromium.sh: chromium is not installed and cannot be installed here (needs root and apt-get)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
for attempt in 1 2 3; do
  if apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null; then
    break
  fi
  echo "chromium.sh: apt-get failed (attempt $attempt)" >&2
  sleep 5
done
command -v chromium >/dev/null

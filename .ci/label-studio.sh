#!/usr/bin/env bash
# Label Studio for tests/test_feedback_labelstudio.py: PyPI's `label-studio` in a virtualenv of its
# own (its pins clash with the project's). Creates the venv if it is missing and prints the path of
# its `label-studio` executable on stdout (the test reads it from $RLHF_LABEL_STUDIO_BIN).
# Exit 0 with the path when it is there (already, or installed now), 1 when it cannot be had here.
# Venv location: $LABEL_STUDIO_VENV, default .cache/label-studio-venv under the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."
LABEL_STUDIO_VERSION="${LABEL_STUDIO_VERSION:-1.23.2}"
venv="${LABEL_STUDIO_VENV:-$PWD/.cache/label-studio-venv}"
exe="$venv/bin/label-studio"
marker="$venv/.installed-$LABEL_STUDIO_VERSION"
if [ -x "$exe" ] && [ -e "$marker" ]; then
  echo "$exe"
  exit 0
fi
python="${PYTHON:-python3}"
rm -rf "$venv"
mkdir -p "$(dirname "$venv")"
if ! "$python" -m venv "$venv" >&2; then
  echo "label-studio.sh: cannot create a virtualenv with $python" >&2
  exit 1
fi
log="$venv.install.log"  # pip's output; only its tail is shown, on failure
"$venv/bin/pip" install --quiet --upgrade pip >"$log" 2>&1 || true
for attempt in 1 2 3; do
  if "$venv/bin/pip" install --quiet "label-studio==$LABEL_STUDIO_VERSION" >>"$log" 2>&1; then
    touch "$marker"
    echo "$exe"
    exit 0
  fi
  echo "label-studio.sh: pip install label-studio failed (attempt $attempt): $(grep -v '^WARNING: Location' "$log" | tail -n 3)" >&2
  sleep $((attempt * 5))
done
echo "label-studio.sh: label-studio $LABEL_STUDIO_VERSION cannot be installed here" >&2
exit 1

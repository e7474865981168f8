#!/usr/bin/env bash
# Makes the virtualenv the Python participant and its end-to-end test run with
# (tests/e2e/python_participant.rs): target/python-venv with requirements.txt installed.
# Idempotent, and quick when nothing changed (the installed requirements are remembered).
#
#   SAGAS_PYTHON_VENV  where to make it (default target/python-venv at the repository root)
#
# Debian's python3 has the venv module without ensurepip, which python3-venv adds: installed
# with apt-get when missing and root.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
VENV=${SAGAS_PYTHON_VENV:-$ROOT/target/python-venv}
REQUIREMENTS=$HERE/requirements.txt
STAMP=$VENV/.requirements.txt

say() { printf 'python venv: %s\n' "$*"; }
die() { printf 'python venv: ERROR: %s\n' "$*" >&2; exit 1; }
have() { command -v "$1" >/dev/null 2>&1; }

if [[ -x $VENV/bin/python ]] && cmp -s "$REQUIREMENTS" "$STAMP" &&
    "$VENV/bin/python" -c 'import pika, psycopg' >/dev/null 2>&1; then
    say "$VENV is up to date ($("$VENV/bin/python" --version))"
    exit 0
fi

if ! have python3 || ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    if [[ $(id -u) -eq 0 ]] && have apt-get; then
        say "apt-get install python3 python3-venv"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q
        apt-get install -y -q --no-install-recommends python3 python3-venv
    else
        die "python3 with its venv module is needed (Debian: apt-get install python3-venv)"
    fi
fi
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    die "Python 3.11 or newer is needed, found $(python3 --version)"

say "making $VENV with $(python3 --version) and $REQUIREMENTS"
rm -rf "$VENV"
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check -r "$REQUIREMENTS"
"$VENV/bin/python" -c 'import pika, psycopg; print("pika", pika.__version__, "psycopg", psycopg.__version__)'
cp "$REQUIREMENTS" "$STAMP"

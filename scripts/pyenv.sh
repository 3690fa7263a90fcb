#!/usr/bin/env bash
# Creates (once) the Python virtualenv the tests use and keeps it in step with
# scripts/requirements-test.txt: packages are (re)installed only when that file's
# content changed since the last install (a sha256 stamp is kept inside the venv).
#
# Usage: PY=$(scripts/pyenv.sh)   # the last line of stdout is the venv's python;
#                                 # everything else goes to stderr.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
req="$here/requirements-test.txt"
cache="${TALLY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tally}"
venv="$cache/pyenv"
stamp="$venv/.requirements.sha256"
py="$venv/bin/python"

log() { echo "pyenv.sh: $*" >&2; }

[[ -f "$req" ]] || { log "missing $req"; exit 1; }
command -v python3 >/dev/null || { log "python3 not found"; exit 1; }

# A fresh Debian's python3 lacks venv/ensurepip until python3-venv is installed.
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    if command -v apt-get >/dev/null && [[ $(id -u) -eq 0 ]]; then
        log "python3 has no venv module; installing python3-venv"
        apt-get update >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y python3-venv >&2
    else
        log "python3 has no venv module; install python3-venv"
        exit 1
    fi
fi

# (Re)create the venv when it is missing or broken (e.g. its base python went away).
if ! "$py" -c 'import sys' >/dev/null 2>&1; then
    log "creating virtualenv at $venv"
    rm -rf "$venv"
    mkdir -p "$cache"
    python3 -m venv "$venv" >&2
fi

want="$(sha256sum "$req" | cut -d' ' -f1)"
have="$(cat "$stamp" 2>/dev/null || true)"
if [[ "$want" != "$have" ]]; then
    log "installing $req"
    "$py" -m pip install --disable-pip-version-check --quiet -r "$req" >&2
    echo "$want" >"$stamp"
else
    log "requirements unchanged; nothing to install"
fi

echo "$py"

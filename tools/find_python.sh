#!/usr/bin/env bash
# find_python.sh VERSION: prints the path of a Python interpreter of that version (e.g. 3.12)
# that runs, from PATH or pyenv, or fails with a message. pyenv's shim for a version that is
# installed but not selected is on PATH yet does not run, so each candidate is tried.
set -uo pipefail
version=${1:?usage: find_python.sh VERSION}
candidates=("$(command -v "python$version" || true)")
if command -v pyenv > /dev/null; then
  while read -r installed; do
    candidates+=("$(pyenv root)/versions/$installed/bin/python")
  done < <(pyenv versions --bare | grep -E "^${version//./\\.}(\\.|$)" | sort -rV)
fi
for candidate in "${candidates[@]}"; do
  if [ -n "$candidate" ] && "$candidate" -c 'import sys' 2> /dev/null; then
    echo "$candidate"
    exit 0
  fi
done
echo "no Python $version found (PATH or pyenv)" >&2
exit 1

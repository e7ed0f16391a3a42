#!/usr/bin/env bash
# Make sure the Debian packages some tests need are present:
#   ensure-packages.sh "WHAT FOR" COMMAND=PACKAGE...
# Installs the packages whose command is missing with apt-get when run as root; otherwise
# warns, and those tests skip (make test still passes).
set -u
purpose=$1
shift
missing=()
for pair in "$@"; do
  command -v "${pair%%=*}" >/dev/null 2>&1 || missing+=("${pair#*=}")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "ensure-packages: installing ${missing[*]} for $purpose"
  if (apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 || \
      (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q "${missing[@]}" >/dev/null 2>&1)); then
    exit 0
  fi
fi
echo "ensure-packages: ${missing[*]} not installed; $purpose will skip" >&2
exit 0

#!/usr/bin/env bash
# Make sure Debian's chromium is present for the dashboard test (tests/test_dashboard.py).
# Installs it with apt-get when run as root; otherwise warns, and that one test skips.
set -u
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "ensure-browser: installing Debian's chromium for the dashboard test"
  if (apt-get install -y -q chromium >/dev/null 2>&1 || \
      (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1)); then
    exit 0
  fi
fi
echo "ensure-browser: chromium is not installed; the dashboard browser test will skip" >&2
exit 0

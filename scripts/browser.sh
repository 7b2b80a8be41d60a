#!/usr/bin/env bash
# Installs Debian's Chromium and its ChromeDriver when missing: the tests drive the job page in a
# real headless browser (tests/browser.py). Needs root and Debian's package registry.
set -euo pipefail
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  exit 0
fi
echo "installing chromium and chromium-driver (Debian packages)"
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q chromium chromium-driver >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null; }

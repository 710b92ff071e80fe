#!/bin/sh
# Debian's Chromium for the dashboard's browser test (tests/test_dashboard_browser.py).
# Playwright drives it from Python (pip `playwright`, in the dev extra); never `playwright install`.
set -eu
if command -v chromium >/dev/null 2>&1; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
command -v chromium

#!/usr/bin/env bash
# What the tests need from the system, installed when it is missing: Prometheus and promtool
# (metrics), openssl (TLS certificates), PostgreSQL (replicas, store), nginx (the load
# balancer of tests/replicas.sh), Mesa's lavapipe (the wgpu backend's tests, no GPU needed),
# Chromium and its WebDriver (the dashboard's tests, headless), curl (the HTTP face's). As root it installs the Debian packages; otherwise it fails,
# naming them. Used by the README's test command and by .ci/run, so a newcomer runs what CI
# runs instead of a green run with the PostgreSQL, nginx and Prometheus tests skipped.
set -euo pipefail

missing=()
command -v prometheus >/dev/null && command -v promtool >/dev/null || missing+=(prometheus)
command -v openssl >/dev/null || missing+=(openssl)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
command -v unshare >/dev/null || missing+=(util-linux)
command -v curl >/dev/null || missing+=(curl)
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
# The GPU code path without a GPU: Mesa's lavapipe (software Vulkan) and the Vulkan loader.
ls /usr/share/vulkan/icd.d/lvp_icd.*.json >/dev/null 2>&1 || missing+=(mesa-vulkan-drivers)
ldconfig -p 2>/dev/null | grep -q 'libvulkan\.so\.1' || missing+=(libvulkan1)

if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "tests/setup.sh: missing Debian packages: ${missing[*]}" >&2
        echo "  install them (sudo apt-get install ${missing[*]}) or run this as root" >&2
        exit 1
    fi
    echo "== installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi
prometheus --version 2>&1 | head -1
ls -d /usr/lib/postgresql/*/bin | tail -n 1

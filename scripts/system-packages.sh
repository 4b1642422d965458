#!/usr/bin/env bash
# The Debian packages the tests need, installed only where missing:
#
#     scripts/system-packages.sh        (`make test` runs it first; as root or with sudo)
#
# * postgresql: the server binaries (initdb, pg_ctl) that the PostgreSQL store's tests
#   start a throwaway server with (trainer/store/pg_testserver.py). Only the binaries
#   are used; the package's own cluster service is never needed.
# * chromium, chromium-driver: the browser tests drive Debian's Chromium through
#   Playwright (no browser download).
# * cmake, g++, make: scripts/llama-cpp.sh builds llama.cpp's server (llama-cpp-python,
#   source only) once, for the tests against a server that is not preflab's own.
#
# When everything is present it only looks, and returns at once.
set -euo pipefail

missing=()
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
command -v chromium >/dev/null 2>&1 || missing+=(chromium chromium-driver)
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
command -v g++ >/dev/null 2>&1 || missing+=(g++)
command -v make >/dev/null 2>&1 || missing+=(make)
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
echo "installing system packages: ${missing[*]}" >&2
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null

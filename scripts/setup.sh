#!/usr/bin/env bash
# Sets up everything dynamo-local needs on a fresh machine: the virtualenv with pinned Python
# packages and, with --test, the Debian packages whose real servers the test suite starts.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

want_test=0
want_bench=0
for arg in "$@"; do
  case "$arg" in
    --test) want_test=1 ;;
    --bench) want_bench=1 ;;
    *) echo "setup.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done

# Debian packages: real servers and tools used by tests (and benchmarks).
debs=()
if [ "$want_test" = 1 ]; then
  debs+=(etcd-server nats-server prometheus prometheus-alertmanager chromium docker-compose)
fi
if [ "$want_bench" = 1 ]; then
  debs+=(wrk prometheus-process-exporter etcd-server)
fi
missing=()
for pkg in "${debs[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "setup: missing Debian packages (run as root or install them): ${missing[*]}" >&2
    exit 1
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.installed"
extras="dev"
key="$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)-$extras"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$key" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[$extras]"
  echo "$key" > "$stamp"
fi

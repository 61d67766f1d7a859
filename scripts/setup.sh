#!/usr/bin/env bash
# Sets up everything dynamo-local needs on a fresh machine: the virtualenv with pinned Python
# packages (including the real Dynamo: frontend, mocker, Planner), Debian's etcd-server (the
# demo graph's Planner needs etcd; `dynamo-local up` runs a private one) and, with --test, the
# Debian packages whose real servers the test suite starts. Idempotent: a second run only
# checks.
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

# Debian packages: etcd for the demo (always), real servers and tools used by tests (and
# benchmarks).
debs=(etcd-server)
if [ "$want_test" = 1 ]; then
  debs+=(nats-server prometheus prometheus-alertmanager chromium docker-compose)
fi
if [ "$want_bench" = 1 ]; then
  debs+=(wrk prometheus-process-exporter)
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
  elif [ "$want_test" = 1 ] || [ "$want_bench" = 1 ]; then
    echo "setup: missing Debian packages (run as root or install them): ${missing[*]}" >&2
    exit 1
  else
    # Only etcd-server is wanted here, and only by graphs with a Planner: say so, and go on
    # setting up the rest (`up` names the package again if such a graph is run).
    echo "setup: missing Debian package etcd-server, which the demo needs (its Planner needs" \
      "etcd): install it as root (apt-get install etcd-server), or run a graph against an" \
      "etcd of yours with \`dynamo-local up GRAPH --etcd-url URL\`" >&2
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
py="$VENV/bin/python"

# The real Dynamo (frontend, mocker, Planner) is wanted by the demo and the tests alike, so
# both modes install it; only where its runtime wheel exists (x86_64).
want_dynamo=0
extras="dev"
if [ "$(uname -m)" = x86_64 ]; then
  want_dynamo=1
  extras="dev,dynamo"
fi
# The .pth file that puts the stand-in folder on the venv's path (see install_dynamo).
standins="$PWD/deploy/standins"
standins_pth() {
  echo "$("$py" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/dynamo_local_standins.pth"
}

# ai-dynamo cannot be installed the normal way: it requires aisimulate, and every aisimulate
# on PyPI is a stub that downloads the real wheel from outside the registries. So its
# dependencies come from pyproject's `dynamo` extra (installed before this), the two wheels
# are installed without dependencies, and `pip check` proves nothing but aisimulate is
# missing. The Planner imports aisimulate_core at module load; a stand-in (deploy/standins,
# put on the venv's path by a .pth file) lets it start and fails clearly if ever used.
install_dynamo() {
  local version tmp problems
  version=$(sed -n 's/^ai-dynamo==//p' constraints.txt)
  if [ -z "$version" ]; then
    echo "setup: constraints.txt pins no ai-dynamo version" >&2
    exit 1
  fi
  tmp=$(mktemp -d)
  # shellcheck disable=SC2064  # expand now: $tmp is local
  trap "rm -rf '$tmp'" EXIT
  "$py" -m pip download -q --no-deps -c constraints.txt -d "$tmp" \
    "ai-dynamo==$version" "ai-dynamo-runtime==$version"
  "$py" -m pip install -q --no-deps "$tmp"/*.whl
  rm -rf "$tmp"
  echo "$standins" > "$(standins_pth)"
  # pip check's findings go to stdout; its warnings about this machine's indexes to stderr.
  problems=$("$py" -m pip check 2>/dev/null | grep -v -e '^ai-dynamo [^ ]* requires aisimulate,' \
    -e '^No broken requirements' || true)
  if [ -n "$problems" ]; then
    echo "setup: broken Python requirements after installing Dynamo $version:" >&2
    echo "$problems" >&2
    exit 1
  fi
  # The modules that import the Planner's undeclared dependencies (and aisimulate_core) when
  # it starts: an import error here would otherwise surface only when a Planner runs.
  "$py" -c 'import dynamo.frontend, dynamo.mocker, dynamo.planner.core.planner_factory
import dynamo.planner.core.load.predictors, dynamo.planner.monitoring.diagnostics_recorder
import dynamo.planner.plugins.registry.gateway' || {
    echo "setup: Dynamo $version is installed but does not import (see above)" >&2
    exit 1
  }
}

stamp="$VENV/.installed"
# Everything that decides what lands in the venv: the declared packages, their pins, this
# script (the Dynamo steps), the extras and the machine.
key="$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -c1-16)-$extras-$(uname -m)"
installed=1
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$key" ]; then
  installed=0
elif [ "$want_dynamo" = 1 ] && [ "$(cat "$(standins_pth)" 2>/dev/null)" != "$standins" ]; then
  # The .pth is gone or names another checkout (the repository moved: so did the editable
  # install's path).
  installed=0
fi
if [ "$installed" = 0 ]; then
  "$py" -m pip install -q --upgrade pip
  "$py" -m pip install -q -c constraints.txt -e ".[$extras]"
  if [ "$want_dynamo" = 1 ]; then
    install_dynamo
  fi
  echo "$key" > "$stamp"
fi

# aiperf, NVIDIA's load generator, which `dynamo-local experiment` drives (and the tests that
# run an experiment): in both modes, in a virtualenv of its own. It cannot share the main one:
# aiperf 0.13 requires huggingface-hub<2 and the Dynamo set pins huggingface-hub 2.x. The
# experiment finds it at .venv-aiperf/bin/aiperf (or $AIPERF).
AIPERF_VENV=${AIPERF_VENV:-.venv-aiperf}
AIPERF_VERSION=0.13.0
aiperf_stamp="$AIPERF_VENV/.installed"
aiperf_key="aiperf==$AIPERF_VERSION-$("$PYTHON" -c 'import sys; print(sys.version.split()[0])')-$(uname -m)"
if [ ! -f "$aiperf_stamp" ] || [ "$(cat "$aiperf_stamp")" != "$aiperf_key" ]; then
  if [ ! -x "$AIPERF_VENV/bin/python" ]; then
    "$PYTHON" -m venv "$AIPERF_VENV"
  fi
  "$AIPERF_VENV/bin/python" -m pip install -q --upgrade pip
  "$AIPERF_VENV/bin/python" -m pip install -q "aiperf==$AIPERF_VERSION"
  if [ "$("$AIPERF_VENV/bin/aiperf" --version 2>/dev/null | tail -n 1)" != "$AIPERF_VERSION" ]; then
    echo "setup: aiperf $AIPERF_VERSION is installed in $AIPERF_VENV but does not run" >&2
    exit 1
  fi
  echo "$aiperf_key" > "$aiperf_stamp"
fi

#!/usr/bin/env bash
# A whole Secure MoR deployment on this machine, for a person to try (docs/deployment.md):
# PKI, a SuperLink with TLS and SuperNode authentication on 127.0.0.1, one SuperNode per client
# institution and one for the key authority (each in its own directory), and a tiny secure
# alignment submitted with `flwr run`. Every process is stopped at the end, also on Ctrl-C.
#
#   scripts/local_deployment.sh [DIR] [extra options of `secure-mor deploy local`, e.g. --no-run]
set -euo pipefail
dir="${1:-runs/deployment}"
shift || true
exec secure-mor deploy local --dir "$dir" "$@"

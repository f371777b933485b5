#!/usr/bin/env bash
# Makes $DVC_REMOTE_URL this checkout's default DVC remote, named `storage`, in .dvc/config.local (never
# committed), with $DVC_REMOTE_ENDPOINT_URL for S3-compatible storage (MinIO, R2, ...). Installs the DVC
# plugin the URL's scheme needs, at the version constraints.txt pins. The credentials stay in the environment
# (AWS_ACCESS_KEY_ID, ...), where the plugin reads them.
# Run from the repository root by retrain.yml and pr-report.yml; tests/ops/test_network_remote.py runs the
# retrain workflow's step, and so this script, against an S3 server. VENV_BIN: where dvc and python are.
set -euo pipefail
bin="${VENV_BIN:-.venv/bin}"

if [ -z "${DVC_REMOTE_URL:-}" ]; then
  echo "::error::set the repository variable DVC_REMOTE_URL (e.g. s3://bucket/tlpipe)"
  exit 1
fi
# plain dvc speaks only local and http remotes: add the plugin for the URL's scheme
case "$DVC_REMOTE_URL" in
  s3://*) plugin=dvc-s3 ;;
  gs://*) plugin=dvc-gs ;;
  azure://*) plugin=dvc-azure ;;
  ssh://*) plugin=dvc-ssh ;;
  *) plugin= ;;
esac
if [ -n "$plugin" ]; then
  "$bin/python" -m pip install --quiet -c constraints.txt "$plugin"
fi
"$bin/dvc" remote add --local --force --default storage "$DVC_REMOTE_URL"
if [ -n "${DVC_REMOTE_ENDPOINT_URL:-}" ]; then
  "$bin/dvc" remote modify --local storage endpointurl "$DVC_REMOTE_ENDPOINT_URL"
fi

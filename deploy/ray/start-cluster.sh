#!/usr/bin/env bash
# Start a Ray head on this machine and an hpo control plane next to it.
# Workers join with:  ray start --address=<head-ip>:6380   (same Python environment, same token)
set -euo pipefail
HEAD_PORT=${HEAD_PORT:-6380}            # Redis often holds 6379
HEAD_IP=${HEAD_IP:-$(hostname -I | awk '{print $1}')}
export RAY_AUTH_MODE=token
ray start --head --port="$HEAD_PORT" --node-ip-address="$HEAD_IP" --disable-usage-stats

export HPO_RAY_ADDRESS="$HEAD_IP:$HEAD_PORT"
export HPO_DATABASE_URL=${HPO_DATABASE_URL:?set HPO_DATABASE_URL, e.g. postgresql://hpo@db/hpo}
export HPO_STORAGE_PATH=${HPO_STORAGE_PATH:?set HPO_STORAGE_PATH to shared storage, e.g. /mnt/shared/hpo}
export HPO_PUBLIC_URL=${HPO_PUBLIC_URL:-http://$HEAD_IP:8000}
export HPO_TOKEN=${HPO_TOKEN:?set HPO_TOKEN}
exec hpo serve --host 0.0.0.0 --port 8000

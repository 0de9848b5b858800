#!/usr/bin/env bash
# Start the MLflow tracking server with proxied artifacts.
#
#   One machine (default): sqlite store and artifacts under tracking/, bound to 127.0.0.1.
#       tracking/start-server.sh
#   Team server: a PostgreSQL backend store and a shared artifact destination, bound where the
#   team can reach it (pip install psycopg2-binary for postgresql:// stores):
#       MLFLOW_BACKEND_STORE_URI=postgresql://mlflow@db-host/mlflow \
#       MLFLOW_ARTIFACTS_DESTINATION=/shared/mlflow-artifacts HOST=0.0.0.0 tracking/start-server.sh
#   Everyone then sets MLFLOW_TRACKING_URI=http://<server>:5000 and runs seg-mlops as usual.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
exec mlflow server \
  --backend-store-uri "${MLFLOW_BACKEND_STORE_URI:-sqlite:///$here/mlflow.db}" \
  --artifacts-destination "${MLFLOW_ARTIFACTS_DESTINATION:-$here/artifacts}" \
  --host "${HOST:-127.0.0.1}" --port "${PORT:-5000}"

#!/usr/bin/env bash
# Start a shared MLflow tracking server for lmforge runs: a database store, artifacts served from S3 (or a
# directory), and MLflow's basic-auth app, so every client signs in with MLFLOW_TRACKING_USERNAME/PASSWORD.
#
#   MLFLOW_FLASK_SERVER_SECRET_KEY=$(openssl rand -hex 32) MLFLOW_AUTH_ADMIN_PASSWORD='at-least-12-chars' \
#   LMFORGE_MLFLOW_DB=postgresql://mlflow@db.internal/mlflow LMFORGE_MLFLOW_ARTIFACTS=s3://bucket/mlflow \
#   LMFORGE_MLFLOW_ALLOWED_HOSTS=mlflow.internal cluster/mlflow-server.sh --host 0.0.0.0
#
# Settings (environment):
#   MLFLOW_FLASK_SERVER_SECRET_KEY  required: signs the auth app's forms; the same value on every server
#   MLFLOW_AUTH_ADMIN_PASSWORD      required on the first start (the admin user is created then), >= 12 chars
#   MLFLOW_AUTH_ADMIN_USERNAME      the admin's name (default admin)
#   LMFORGE_MLFLOW_DB               runs and models: postgresql://..., mysql+pymysql://..., or sqlite:////path
#                                   (default: a SQLite file in the state directory, for one machine)
#   LMFORGE_MLFLOW_AUTH_DB          users and permissions (default: basic_auth.db in the state directory)
#   LMFORGE_MLFLOW_ARTIFACTS        s3://bucket/prefix (default: artifacts/ in the state directory)
#   LMFORGE_MLFLOW_ALLOWED_HOSTS    comma-separated names clients put in their URL (required off loopback)
#   LMFORGE_MLFLOW_STATE            the state directory (default ~/.lmforge/mlflow-server)
#   LMFORGE_MLFLOW_DEFAULT_PERMISSION  what every user may do in others' experiments: READ (default), EDIT,
#                                   MANAGE or NO_PERMISSIONS
# Options: --host ADDRESS (default 127.0.0.1), --port PORT (default 5000); the rest go to `mlflow server`.
set -euo pipefail
me="$(basename "$0")"
fail() { echo "$me: $*" >&2; exit 2; }

host=127.0.0.1
port=5000
args=()
while (($#)); do
  case "$1" in
    --host=*) host="${1#*=}" ;;
    --host) host="${2:?--host needs an address}"; shift ;;
    --port=*) port="${1#*=}" ;;
    --port) port="${2:?--port needs a number}"; shift ;;
    *) args+=("$1") ;;
  esac
  shift
done

[[ -n "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]] || fail "MLFLOW_FLASK_SERVER_SECRET_KEY is not set; set the same" \
  "secret on every server process, e.g. export MLFLOW_FLASK_SERVER_SECRET_KEY=\$(openssl rand -hex 32)"

state="${LMFORGE_MLFLOW_STATE:-$HOME/.lmforge/mlflow-server}"
mkdir -p "$state"
chmod 700 "$state"  # it holds the password hashes (and, for one machine, every run)
db="${LMFORGE_MLFLOW_DB:-sqlite:///$state/mlflow.db}"
auth_db="${LMFORGE_MLFLOW_AUTH_DB:-sqlite:///$state/basic_auth.db}"
artifacts="${LMFORGE_MLFLOW_ARTIFACTS:-$state/artifacts}"
permission="${LMFORGE_MLFLOW_DEFAULT_PERMISSION:-READ}"
case "$permission" in
  READ|EDIT|MANAGE|NO_PERMISSIONS) ;;
  *) fail "LMFORGE_MLFLOW_DEFAULT_PERMISSION=$permission is not one of READ, EDIT, MANAGE, NO_PERMISSIONS" ;;
esac

# MLflow needs the admin password only while the admin user does not exist. For a SQLite user store that is
# "the file is missing"; a database server is asked by MLflow itself, which then names the same variable.
password="${MLFLOW_AUTH_ADMIN_PASSWORD:-}"
if [[ -n "$password" && ${#password} -lt 12 ]]; then
  fail "MLFLOW_AUTH_ADMIN_PASSWORD has ${#password} characters; MLflow needs at least 12"
fi
if [[ -z "$password" && "$auth_db" == sqlite:///* && ! -s "${auth_db#sqlite:///}" ]]; then
  fail "MLFLOW_AUTH_ADMIN_PASSWORD is not set; the first start creates the admin user" \
    "(${MLFLOW_AUTH_ADMIN_USERNAME:-admin}) with it (12 characters or more)"
fi

case "$host" in
  127.*|localhost|::1) ;;
  *) [[ -n "${LMFORGE_MLFLOW_ALLOWED_HOSTS:-}" ]] || fail "--host $host opens the server to the network;" \
       "set LMFORGE_MLFLOW_ALLOWED_HOSTS to the names clients use in their URL (e.g. mlflow.internal)" ;;
esac
# MLflow compares the whole Host header, port included: allow each name bare and with any port. Loopback
# stays allowed so the machine itself (and an SSH tunnel) can reach it.
allowed="localhost,localhost:*,127.0.0.1,127.0.0.1:*"
IFS=',' read -r -a names <<<"${LMFORGE_MLFLOW_ALLOWED_HOSTS:-}"
for name in ${names[@]+"${names[@]}"}; do
  name="${name// /}"
  [[ -n "$name" ]] && allowed+=",$name,$name:*"
done

# The auth app reads its store and defaults from an ini file, never from flags.
ini="$state/basic_auth.ini"
umask 077
cat >"$ini" <<EOF
[mlflow]
default_permission = $permission
database_uri = $auth_db
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
EOF
export MLFLOW_AUTH_CONFIG_PATH="$ini"

shown_db="$(sed -E 's#://[^/@]*@#://***@#' <<<"$db")"  # never echo a password in the database URI
echo "$me: MLflow on http://$host:$port with basic auth; runs in $shown_db, artifacts in $artifacts;" \
     "clients set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" >&2
[[ "$artifacts" == s3://* ]] || echo "$me: artifacts are kept on this machine's disk ($artifacts); clients" \
  "upload them through the server either way, but an s3:// location survives the machine" >&2
exec mlflow server --app-name basic-auth --host "$host" --port "$port" --backend-store-uri "$db" \
  --artifacts-destination "$artifacts" --serve-artifacts --allowed-hosts "$allowed" ${args[@]+"${args[@]}"}

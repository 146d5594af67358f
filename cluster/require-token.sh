# Sourced by start-head.sh and start-worker.sh: no Ray node of lmforge's starts without token authentication.
# Anyone who can reach an unauthenticated Ray node can run any code on it, as the user who started it.
if [[ -z "${RAY_AUTH_TOKEN:-}" ]]; then
  echo "$(basename "$0"): RAY_AUTH_TOKEN is not set; set the same secret on every node and client," \
       "e.g. export RAY_AUTH_TOKEN=\$(openssl rand -hex 32)" >&2
  exit 2
fi
# Ray 2.60 checks the token only in token mode; an inherited RAY_AUTH_MODE=disabled would switch it off.
export RAY_AUTH_MODE=token

#!/bin/sh
# Seeds OllamaFlow through its admin API: one backend per Ollama (or simulator) container, and
# frontend1 serving all of them. Idempotent: PUT on an existing identifier replaces it.
set -eu
: "${OLLAMAFLOW:=http://ollamaflow:43411}"
: "${TOKEN:=change-this-admin-token}"
: "${BACKENDS:=ollama1 ollama2 ollama3}"
: "${BACKEND_PORT:=11434}"
: "${REQUIRED_MODELS:=[]}"
auth="Authorization: Bearer $TOKEN"
list=""
for name in $BACKENDS; do
  body="{\"Identifier\": \"$name\", \"Hostname\": \"$name\", \"Port\": $BACKEND_PORT}"
  curl -fsS -X PUT -H "$auth" "$OLLAMAFLOW/v1.0/backends/$name" -d "$body" >/dev/null \
    || curl -fsS -X PUT -H "$auth" "$OLLAMAFLOW/v1.0/backends" -d "$body" >/dev/null
  list="$list${list:+, }\"$name\""
done
curl -fsS -X PUT -H "$auth" "$OLLAMAFLOW/v1.0/frontends/frontend1" \
  -d "{\"Hostname\": \"*\", \"Backends\": [$list], \"RequiredModels\": $REQUIRED_MODELS}" >/dev/null
curl -fsS -X DELETE -H "$auth" "$OLLAMAFLOW/v1.0/backends/backend1" >/dev/null 2>&1 || true
echo "seeded: $BACKENDS"

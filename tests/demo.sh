#!/usr/bin/env bash
# `make demo`: a local fake SambaNova plus the proxy wired to it, so a newcomer can
# try every endpoint with no account.  Usage: bash tests/demo.sh PYTHON FAKE_PORT
set -euo pipefail
PY=${1:?usage: demo.sh PYTHON FAKE_PORT}
FAKE_PORT=${2:-8123}
cd "$(dirname "$0")/.."

FAKE="http://127.0.0.1:${FAKE_PORT}"
DEMO_EMAIL=demo@example.com
DEMO_PASSWORD=demo-password
PROXY="http://127.0.0.1:${PORT:-8666}"

"$PY" tests/fake_samba.py --host 127.0.0.1 --port "$FAKE_PORT" \
    --email "$DEMO_EMAIL" --password "$DEMO_PASSWORD" --delay 0.05 &
FAKE_PID=$!
stop_fake() {
    kill "$FAKE_PID" 2>/dev/null || true
    wait "$FAKE_PID" 2>/dev/null || true
}
trap stop_fake EXIT
trap 'exit 130' INT TERM

# Wait (at most ~10 s) until the fake answers, or stop if it died (port taken?).
ready=0
for _ in $(seq 1 100); do
    if ! kill -0 "$FAKE_PID" 2>/dev/null; then
        echo "demo: the fake SambaNova did not start (is port $FAKE_PORT free? try DEMO_FAKE_PORT=...)" >&2
        exit 1
    fi
    if "$PY" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)' \
            "$FAKE/api/config" 2>/dev/null; then
        ready=1
        break
    fi
    sleep 0.1
done
if [ "$ready" != 1 ]; then
    echo "demo: the fake SambaNova on $FAKE did not answer in time" >&2
    exit 1
fi

cat <<EOF
demo: fake SambaNova on $FAKE (login $DEMO_EMAIL); starting the proxy on $PROXY.
demo: try, from another terminal (add -H 'authorization: Bearer <key>' if LOCAL_API_KEY is set):
  curl $PROXY/info
  curl $PROXY/healthz        (liveness)      curl $PROXY/readyz   (readiness: 200 once logged in)
  curl $PROXY/metrics        (Prometheus; needs the key unless METRICS_PUBLIC=1)
  curl $PROXY/v1/models
  curl $PROXY/v1/chat/completions -H 'content-type: application/json' \\
       -d '{"model": "DeepSeek-R1", "messages": [{"role": "user", "content": "Hello"}]}'
  curl -N $PROXY/v1/chat/completions -H 'content-type: application/json' \\
       -d '{"model": "DeepSeek-R1", "stream": true, "messages": [{"role": "user", "content": "Hello"}]}'
  open $PROXY/ in a browser for the status page.  One access-log line per request below.
  Ctrl-C stops both.
EOF

# The environment wins over .env, so these keep a local .env from pointing the demo elsewhere.
SAMBA_EMAIL="$DEMO_EMAIL" SAMBA_PASSWORD="$DEMO_PASSWORD" \
SAMBA_CONFIG_URL="$FAKE/api/config" \
SAMBA_COMPLETION_URL="$FAKE/api/completion" \
SAMBA_MODELS_URL="$FAKE/v1/models" \
SAMBANOVA_API_URL="$FAKE/v1" SAMBANOVA_API_KEY= SAMBA_ACCESS_TOKEN= \
TOKEN_CACHE_FILE= HOST="${HOST:-127.0.0.1}" \
    "$PY" sambaproxy.py

#!/usr/bin/env bash
# Make sure PostgreSQL and Redis answer; start the local ones if installed but stopped.
# Fails with a clear message when one is missing. Used by `make test`.
set -u
PGHOST_=${COSCRIBE_TEST_PGHOST:-127.0.0.1}
PGPORT_=${COSCRIBE_TEST_PGPORT:-5432}
REDIS_HOST_=${COSCRIBE_TEST_REDIS_HOST:-127.0.0.1}
REDIS_PORT_=${COSCRIBE_TEST_REDIS_PORT:-6379}

pg_ok() { pg_isready -q -h "$PGHOST_" -p "$PGPORT_" 2>/dev/null; }
redis_ok() { [ "$(redis-cli -h "$REDIS_HOST_" -p "$REDIS_PORT_" ping 2>/dev/null)" = "PONG" ]; }
wait_for() { for _ in $(seq 1 50); do "$1" && return 0; sleep 0.2; done; return 1; }

if ! pg_ok; then
  if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
    echo "ensure-services: starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
    wait_for pg_ok || { echo "ensure-services: PostgreSQL did not come up on $PGHOST_:$PGPORT_" >&2; exit 1; }
  else
    echo "ensure-services: PostgreSQL is not answering on $PGHOST_:$PGPORT_ and is not installed here." >&2
    echo "  Install it (apt-get install postgresql) or point COSCRIBE_TEST_DATABASE_URL at a server." >&2
    exit 1
  fi
fi

if ! redis_ok; then
  if command -v redis-server >/dev/null 2>&1; then
    echo "ensure-services: starting Redis"
    redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT_" --save "" --appendonly no >/dev/null
    wait_for redis_ok || { echo "ensure-services: Redis did not come up on $REDIS_HOST_:$REDIS_PORT_" >&2; exit 1; }
  else
    echo "ensure-services: Redis is not answering on $REDIS_HOST_:$REDIS_PORT_ and is not installed here." >&2
    echo "  Install it (apt-get install redis-server) or point COSCRIBE_TEST_REDIS_URL at a server." >&2
    exit 1
  fi
fi
echo "ensure-services: PostgreSQL and Redis answer"

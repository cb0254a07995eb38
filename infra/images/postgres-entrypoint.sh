#!/usr/bin/env bash
# The subset of the official postgres image's entrypoint this stack relies on: initialise PGDATA on
# first start (superuser POSTGRES_USER with POSTGRES_PASSWORD, database POSTGRES_DB, then the scripts in
# /docker-entrypoint-initdb.d), then run the server as user postgres, listening on all interfaces.
set -euo pipefail

if [[ "${1:-}" != "postgres" ]]; then
    exec "$@"
fi
if [[ "$(id -u)" == "0" ]]; then
    mkdir -p "$PGDATA" && chown postgres:postgres "$PGDATA" && chmod 0700 "$PGDATA"
    exec gosu postgres "$0" "$@"
fi

user="${POSTGRES_USER:-postgres}"
db="${POSTGRES_DB:-$user}"
if [[ ! -s "$PGDATA/PG_VERSION" ]]; then
    : "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD must be set}"
    pwfile="$(mktemp)"
    printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
    initdb --username="$user" --pwfile="$pwfile" --auth-local=trust --auth-host=scram-sha-256 \
        --encoding=UTF8 -D "$PGDATA"
    rm -f "$pwfile"
    printf 'host all all all scram-sha-256\n' >> "$PGDATA/pg_hba.conf"
    # Initialise over the Unix socket only, so nothing can connect before the scripts have run.
    pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start
    if [[ "$db" != "postgres" ]]; then
        psql -v ON_ERROR_STOP=1 --username "$user" --dbname postgres -c "CREATE DATABASE \"$db\""
    fi
    for script in /docker-entrypoint-initdb.d/*; do
        case "$script" in
            *.sql) psql -v ON_ERROR_STOP=1 --username "$user" --dbname "$db" -f "$script" ;;
            *.sh) . "$script" ;;
            *) ;;
        esac
    done
    pg_ctl -D "$PGDATA" -m fast -w stop
fi
exec postgres -c listen_addresses='*' "${@:2}"

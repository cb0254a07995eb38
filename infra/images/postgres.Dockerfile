# Offline stand-in for the official postgres:<major>.<minor>-bookworm image: Debian's PostgreSQL server
# (the same major version) with the official image's interface: POSTGRES_USER / POSTGRES_PASSWORD /
# POSTGRES_DB, /docker-entrypoint-initdb.d on first start, PGDATA=/var/lib/postgresql/data, user
# postgres (uid 999). Built by infra/images/build.sh, tagged as the public image.
ARG BASE_IMAGE=debian:12.15-slim
FROM ${BASE_IMAGE}
ARG PG_MAJOR=15
ENV PG_MAJOR=${PG_MAJOR} \
    PATH=/usr/lib/postgresql/${PG_MAJOR}/bin:$PATH \
    PGDATA=/var/lib/postgresql/data \
    LANG=C.UTF-8
# The official image's uid/gid, so volumes move between the two images unchanged.
# Debian packages follow the pinned base release (security updates included), so no
# per-package version pins: those break with every point release.
# hadolint ignore=DL3008
RUN groupadd --system --gid 999 postgres \
    && useradd --system --uid 999 --gid postgres --home-dir /var/lib/postgresql --shell /bin/bash postgres \
    && apt-get update \
    && apt-get install -y --no-install-recommends "postgresql-${PG_MAJOR}" gosu \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/apt /var/log/dpkg.log \
    && mkdir -p /docker-entrypoint-initdb.d /var/run/postgresql "$PGDATA" \
    && chown -R postgres:postgres /var/run/postgresql /var/lib/postgresql \
    && chmod 0700 "$PGDATA"
COPY postgres-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
STOPSIGNAL SIGINT
EXPOSE 5432
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["postgres"]

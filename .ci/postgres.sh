# shellcheck shell=bash
# A throwaway PostgreSQL server for the tests marked `postgres`: sourced by .ci/run (and usable by
# hand: `. .ci/postgres.sh && pg_start`). pg_start installs Debian's postgresql package if no
# server binaries are found, initialises a cluster in a temporary directory, starts it on
# 127.0.0.1 at a free port (nothing else listens), creates the database bench_test and exports
#   BENCH_TEST_POSTGRES=postgresql+psycopg://bench:bench@127.0.0.1:PORT/bench_test
# pg_stop stops the server and deletes the directory. Any failure returns non-zero.

pg_bindir() {
  local dir
  if command -v pg_config >/dev/null 2>&1 && [ -x "$(pg_config --bindir)/initdb" ]; then
    pg_config --bindir; return 0
  fi
  for dir in /usr/lib/postgresql/*/bin; do
    if [ -x "$dir/initdb" ]; then echo "$dir"; return 0; fi
  done
  return 1
}

pg_as_owner() {  # run a server binary as the cluster's owner: initdb and postgres refuse to run as root
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

pg_start() {
  local bindir port
  if ! bindir="$(pg_bindir)"; then
    echo "CI: installing PostgreSQL (Debian package postgresql)" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null || return 1
    bindir="$(pg_bindir)" || { echo "CI: no PostgreSQL server binaries after installing" >&2; return 1; }
  fi
  PG_BINDIR="$bindir"
  PG_DIR="$(mktemp -d)"
  export PG_BINDIR PG_DIR
  if [ "$(id -u)" -eq 0 ]; then chown postgres "$PG_DIR" || return 1; fi
  port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  pg_as_owner "$bindir/initdb" -D "$PG_DIR/data" -U bench --auth=trust -E UTF8 >"$PG_DIR/initdb.log" 2>&1 \
    || { cat "$PG_DIR/initdb.log" >&2; return 1; }
  pg_as_owner "$bindir/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/server.log" -w -t 60 \
    -o "-h 127.0.0.1 -p $port -k $PG_DIR -c max_connections=200 -c fsync=off" start >/dev/null \
    || { cat "$PG_DIR/server.log" >&2; return 1; }
  "$bindir/createdb" -h 127.0.0.1 -p "$port" -U bench bench_test || return 1
  export BENCH_TEST_POSTGRES="postgresql+psycopg://bench:bench@127.0.0.1:$port/bench_test"
  echo "CI: PostgreSQL $("$bindir/pg_ctl" --version | awk '{print $3}') on 127.0.0.1:$port" >&2
}

pg_stop() {
  if [ -n "${PG_DIR:-}" ] && [ -n "${PG_BINDIR:-}" ] && [ -f "$PG_DIR/data/postmaster.pid" ]; then
    pg_as_owner "$PG_BINDIR/pg_ctl" -D "$PG_DIR/data" -m fast -w stop >/dev/null 2>&1 || true
  fi
  if [ -n "${PG_DIR:-}" ]; then rm -rf "$PG_DIR"; fi
}

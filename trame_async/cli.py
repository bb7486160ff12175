"""``trame-serve``: run a trame_async relay server from the command line.

Ctrl+C (SIGINT) or SIGTERM shuts it down gracefully (queued frames flushed, clients told to retry)
and the process exits 0. ``--cluster`` joins other servers through NATS; ``--workers N`` runs N
server processes on one port (:mod:`trame_async.workers` supervises them).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib
import ipaddress
import json
import logging
import os
import re
import signal
import socket
import ssl
import sys
from collections.abc import Callable, Sequence
from typing import Any, Final, NoReturn

from . import __version__
from .client import TOKEN_ENV
from .cluster.config import MAX_NODES, ClusterConfig, parse_urls
from .netutil import get_host_ip
from .server import ServerConfig, start_server

__all__ = ["main"]

logger = logging.getLogger("trame_async.cli")


class OneLineErrors(argparse.ArgumentParser):
    """An argument parser whose errors are one line naming the option, exit status 2.

    argparse's own prints the whole usage first: with this many options, a screenful that hides
    the one line that matters.
    """

    def error(self, message: str) -> NoReturn:
        """Print ``prog: message`` and a pointer to --help on stderr, then exit with status 2."""
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _is_off(text: str) -> bool:
    """Whether an option's value disables it: ``off``, ``none`` or ``0``."""
    return text.lower() in ("none", "off", "0")


def _seconds(text: str) -> float | None:
    if text.lower() in ("none", "off"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a number of seconds: {text!r} (e.g. 5, 0.5, or 'off')"
        ) from None
    if value == 0:
        # Zero used to mean 'off' silently: say it, so that nobody switches a limit off by mistake.
        raise argparse.ArgumentTypeError("0 is not a duration: write 'off' to disable it")
    if not value > 0:
        raise argparse.ArgumentTypeError("must be a positive number of seconds (or 'off')")
    return value


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        host = "127.0.0.1"
    host = host.strip("[]") or "127.0.0.1"
    return host, _port(port)


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(
            f"{value} is not a TCP port: use 1 to 65535, or 0 to let the OS choose"
        )
    return value


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    lowered = text.lower().removesuffix("ib").removesuffix("b")
    factor = units.get(lowered[-1:], 1)
    number = lowered[:-1] if factor != 1 else lowered
    try:
        value = int(float(number) * factor)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a size in bytes: {text!r} (e.g. 65536, 64k, 1M)"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1 byte")
    return value


def _size_or_off(text: str) -> int | None:
    if _is_off(text):
        return None
    return _size(text)


def _rate(text: str) -> int:
    return 0 if text.strip() == "0" else _size(text)


def _count_or_off(text: str) -> int | None:
    if _is_off(text):
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r} (or 'off')") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1 (or 'off')")
    return value


def _positive_seconds(text: str) -> float:
    value = _seconds(text)
    if value is None:
        raise argparse.ArgumentTypeError("cannot be 'off': give a number of seconds")
    return value


def _workers(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 1 <= value <= MAX_NODES:
        raise argparse.ArgumentTypeError(f"must be between 1 and {MAX_NODES}, not {value}")
    return value


def _node_index(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 0 <= value < MAX_NODES:
        raise argparse.ArgumentTypeError(f"must be between 0 and {MAX_NODES - 1}, not {value}")
    return value


def _nats_urls(text: str) -> tuple[str, ...]:
    urls = parse_urls(text)
    if not urls:
        raise argparse.ArgumentTypeError("give at least one NATS URL (nats://host:4222)")
    return urls


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of ``trame-serve`` (every option documented)."""
    d = ServerConfig()
    p = OneLineErrors(
        prog="trame-serve",
        description=(
            "Run a trame_async relay: every client's multicast reaches every connected client. "
            "Ctrl+C or SIGTERM shuts down cleanly."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"trame-serve {__version__}")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all IPv4)")
    p.add_argument("--port", type=_port, default=8765, help="TCP port; 0 lets the OS choose")
    p.add_argument(
        "--heartbeat-interval",
        type=_seconds,
        default=d.heartbeat_interval,
        metavar="S",
        help="seconds between pings to each client ('off' disables heartbeats)",
    )
    p.add_argument(
        "--heartbeat-timeout",
        type=_seconds,
        default=d.heartbeat_timeout,
        metavar="S",
        help="declare a client dead when nothing arrives this long after a ping",
    )
    p.add_argument(
        "--max-frame-size",
        type=_size,
        default=d.max_frame_size,
        metavar="N",
        help="largest frame accepted from a client, in bytes (security limit)",
    )
    p.add_argument(
        "--loop",
        choices=("auto", "asyncio", "uvloop"),
        default="auto",
        help="event loop: uvloop when installed with 'auto'",
    )
    p.add_argument(
        "--metrics",
        type=_address,
        default=None,
        metavar="[HOST:]PORT",
        help=(
            "serve Prometheus metrics (/metrics) and a JSON snapshot (/stats.json) on this "
            "address (a bare port: loopback); needs trame-async[metrics]"
        ),
    )
    p.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="log lines as text, or as one JSON object per line (for log collectors)",
    )
    p.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
        help="logging level (connects and disconnects are logged at INFO)",
    )
    sec = p.add_argument_group("limits and security")
    sec.add_argument(
        "--token",
        default=argparse.SUPPRESS,  # its default is the environment's, said in the help
        help=f"shared secret clients must present (default: ${TOKEN_ENV} if set); never logged",
    )
    sec.add_argument(
        "--allow-anonymous",
        action="store_true",
        help="allow listening on a non-loopback address without a token",
    )
    sec.add_argument("--tls-cert", metavar="FILE", help="PEM certificate chain: serve over TLS")
    sec.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert")
    sec.add_argument(
        "--tls-client-ca",
        metavar="FILE",
        help="PEM CA bundle: require client certificates signed by it",
    )
    sec.add_argument("--max-clients", type=int, default=None, metavar="N", help="connection limit")
    sec.add_argument(
        "--handshake-timeout",
        type=_seconds,
        default=d.handshake_timeout,
        metavar="S",
        help="close connections that do not complete the handshake (TLS and HELLO) in time",
    )
    sec.add_argument(
        "--frame-timeout",
        type=_seconds,
        default=d.frame_timeout,
        metavar="S",
        help="close connections that leave a frame unfinished this long (slow-loris)",
    )
    sec.add_argument(
        "--max-queue-bytes",
        type=_size,
        default=argparse.SUPPRESS,  # unset: the default, raised to --max-frame-size if below it
        metavar="N",
        help=(
            f"outbound budget per client before the slow-consumer policy applies; at least "
            f"--max-frame-size (default: {d.max_queue_bytes}, raised to --max-frame-size if "
            f"smaller)"
        ),
    )
    sec.add_argument(
        "--slow-consumer-policy",
        choices=("disconnect", "drop-oldest", "keep-latest"),
        default=d.slow_consumer_policy,
        help="what to do with a client over its budget",
    )
    sec.add_argument(
        "--slow-consumer-timeout",
        type=_seconds,
        default=d.slow_consumer_timeout,
        metavar="S",
        help=(
            "cut a congested client that takes less than --slow-consumer-min-rate of its "
            "backlog this long (checked every quarter of it)"
        ),
    )
    sec.add_argument(
        "--slow-consumer-min-rate",
        type=_rate,
        default=d.slow_consumer_min_rate,
        metavar="N",
        help="bytes per second a congested client must take to count as draining (1k: 1 KiB/s)",
    )
    sec.add_argument(
        "--keep-latest-streams",
        type=int,
        default=d.keep_latest_streams,
        metavar="N",
        help="keep-latest: most (sender, trame) streams kept for one congested client",
    )
    sec.add_argument(
        "--flow-control",
        choices=("off", "pace"),
        default=d.flow_control,
        help=(
            "'off': one client's congestion never slows anyone; 'pace' (disconnect policy "
            "only): publishers wait for congested readers that drain at --pace-min-rate"
        ),
    )
    sec.add_argument(
        "--pace-min-rate",
        type=_rate,
        default=d.pace_min_rate,
        metavar="N",
        help="pace mode: bytes per second a congested reader must take for publishers to wait",
    )
    sec.add_argument(
        "--max-publisher-pause",
        type=float,
        default=d.max_publisher_pause,
        metavar="S",
        help="longest publisher pause for one congestion (pace) or server-wide budget pass",
    )
    sec.add_argument(
        "--max-total-queue-bytes",
        type=_size_or_off,
        default=d.max_total_queue_bytes,
        metavar="N",
        help="server-wide budget of bytes pending for all clients ('off': none)",
    )
    grp = p.add_argument_group("groups")
    grp.add_argument(
        "--max-groups-per-client",
        type=int,
        default=d.max_groups_per_client,
        metavar="N",
        help="groups one client may be in at once",
    )
    grp.add_argument(
        "--max-groups", type=int, default=d.max_groups, metavar="N", help="groups at once"
    )
    grp.add_argument(
        "--max-group-name-length",
        type=int,
        default=d.max_group_name_length,
        metavar="N",
        help="longest group name, in bytes of UTF-8 (at most 255)",
    )
    grp.add_argument(
        "--max-presence-members",
        type=int,
        default=d.max_presence_members,
        metavar="N",
        help="presence events and member lists only for groups up to N members",
    )
    grp.add_argument(
        "--last-value-groups",
        nargs="+",
        default=list(d.last_value_groups),
        metavar="PATTERN",
        help="groups (fnmatch patterns, e.g. 'zone/*') that keep last values for late joiners",
    )
    grp.add_argument(
        "--last-values-max-count",
        type=int,
        default=d.last_values_max_count,
        metavar="N",
        help="last values kept per group at most",
    )
    grp.add_argument(
        "--last-values-max-bytes",
        type=_size,
        default=d.last_values_max_bytes,
        metavar="N",
        help="bytes of last values kept per group at most",
    )
    grp.add_argument(
        "--last-values-total-max-bytes",
        type=_size,
        default=d.last_values_total_max_bytes,
        metavar="N",
        help="bytes of last values kept by all groups together at most",
    )
    sec.add_argument(
        "--max-unknown-formats",
        type=_count_or_off,
        default=d.max_unknown_formats,
        metavar="N",
        help="formats of unregistered trames one client may make the server learn ('off': any)",
    )
    sec.add_argument(
        "--max-handshaking",
        type=_count_or_off,
        default=d.max_handshaking,
        metavar="N",
        help="connections allowed in their handshake at once, apart from --max-clients",
    )
    sec.add_argument(
        "--handshake-max-frame-size",
        type=_size,
        default=argparse.SUPPRESS,  # unset: the default, lowered to --max-frame-size if above it
        metavar="N",
        help=(
            f"largest frame accepted before a client's handshake completes; at most "
            f"--max-frame-size (default: {d.handshake_max_frame_size}, lowered to "
            f"--max-frame-size if larger)"
        ),
    )
    sec.add_argument(
        "--write-high-water",
        type=_size,
        default=d.write_high_water,
        metavar="N",
        help="transport buffer at which a client counts as congested",
    )
    sec.add_argument(
        "--send-buffer-size",
        type=_size_or_off,
        default=d.send_buffer_size,
        metavar="N",
        help=(
            "SO_SNDBUF of client sockets, kept modest so the outbound budget is the real bound "
            "('off' or 0: the OS default)"
        ),
    )
    sec.add_argument(
        "--retry-after",
        type=_seconds,
        default=d.retry_after,
        metavar="S",
        help="retry-after hint sent to clients in the shutdown goodbye",
    )
    sec.add_argument(
        "--drain-timeout",
        type=float,
        default=d.drain_timeout,
        metavar="S",
        help="on shutdown, time allowed for queued frames to reach clients",
    )
    c = ClusterConfig()
    cl = p.add_argument_group("cluster and workers (pip install 'trame-async[cluster]')")
    cl.add_argument(
        "--cluster",
        type=_nats_urls,
        default=None,
        metavar="URL[,URL...]",
        help=(
            "join a cluster through these NATS servers (nats://h1:4222,nats://h2:4222): the "
            "servers of one cluster relay as one"
        ),
    )
    cl.add_argument(
        "--cluster-name",
        default=c.name,
        metavar="NAME",
        help="the cluster's name, shared by its servers (letters, digits, '_', '-')",
    )
    cl.add_argument(
        "--node-index",
        type=_node_index,
        default=None,
        metavar="N",
        help=(
            f"this server's index in the cluster, 0 to {MAX_NODES - 1}, the high bits of its "
            f"clients' ids (default: a free one picked at start; with --workers: 0, and worker "
            f"i takes N+i)"
        ),
    )
    cl.add_argument(
        "--cluster-heartbeat",
        type=_positive_seconds,
        default=c.heartbeat_interval,
        metavar="S",
        help="seconds between heartbeats of each server on NATS; one silent 3 times as long is gone",
    )
    cl.add_argument(
        "--workers",
        type=_workers,
        default=1,
        metavar="N",
        help=(
            "run N server processes on one port (SO_REUSEPORT), restarted if they die, relaying "
            "as one through --cluster, or else through a nats-server of their own on loopback"
        ),
    )
    return p


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if choice == "asyncio":
        return asyncio.new_event_loop
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise SystemExit(
                "trame-serve: --loop uvloop needs uvloop: pip install 'trame-async[uvloop]'"
            ) from None
        return asyncio.new_event_loop
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def _tls_context(
    args: argparse.Namespace, parser: argparse.ArgumentParser
) -> ssl.SSLContext | None:
    if not args.tls_cert and not args.tls_key:
        if args.tls_client_ca:
            parser.error("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if not (args.tls_cert and args.tls_key):
        parser.error("give both --tls-cert and --tls-key")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(args.tls_cert, args.tls_key)
    except (OSError, ssl.SSLError) as err:
        parser.error(
            f"--tls-cert {args.tls_cert} / --tls-key {args.tls_key}: {_why(err)} (PEM files "
            f"of the certificate chain and its private key)"
        )
    if args.tls_client_ca:
        try:
            ctx.load_verify_locations(args.tls_client_ca)
        except (OSError, ssl.SSLError) as err:
            parser.error(f"--tls-client-ca {args.tls_client_ca}: {_why(err)}")
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _why(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return f"{err.strerror}" + (f": {err.filename}" if err.filename else "")
    return str(err) or type(err).__name__


def _frame_limits(args: argparse.Namespace) -> tuple[int, int]:
    """Return ``(max_queue_bytes, handshake_max_frame_size)``, defaults fitted to --max-frame-size.

    A default that does not fit is adjusted, with a warning. A value given is returned as is:
    if it contradicts --max-frame-size, ServerConfig refuses it and :func:`_config` exits 2.
    """
    d = ServerConfig()
    frame = args.max_frame_size
    queue: int | None = getattr(args, "max_queue_bytes", None)
    if queue is None:
        queue = d.max_queue_bytes
        if queue < frame:
            logger.warning(
                "--max-queue-bytes raised from its default %d to --max-frame-size %d so that "
                "one frame always fits",
                queue,
                frame,
            )
            queue = frame
    early: int | None = getattr(args, "handshake_max_frame_size", None)
    if early is None:
        early = d.handshake_max_frame_size
        if early > frame:
            logger.warning(
                "--handshake-max-frame-size lowered from its default %d to --max-frame-size %d",
                early,
                frame,
            )
            early = frame
    return queue, early


#: ServerConfig field names in its error messages, each the name of an option here.
_FIELD_NAME: Final = re.compile(r"\b[a-z]+(?:_[a-z]+)+\b")
_OPTION_FIELDS: Final = frozenset(f.name for f in dataclasses.fields(ServerConfig))


def _option_names(message: str) -> str:
    """Say ``--max-frame-size`` where a ServerConfig error says ``max_frame_size``."""
    return _FIELD_NAME.sub(
        lambda m: "--" + m[0].replace("_", "-") if m[0] in _OPTION_FIELDS else m[0], message
    )


def _config(
    args: argparse.Namespace, parser: argparse.ArgumentParser, token: str | None
) -> ServerConfig:
    max_queue_bytes, handshake_max_frame_size = _frame_limits(args)
    try:
        return ServerConfig(
            heartbeat_interval=args.heartbeat_interval,
            heartbeat_timeout=args.heartbeat_timeout,
            max_frame_size=args.max_frame_size,
            handshake_timeout=args.handshake_timeout,
            frame_timeout=args.frame_timeout,
            max_clients=args.max_clients,
            token=token,
            max_queue_bytes=max_queue_bytes,
            slow_consumer_policy=args.slow_consumer_policy,
            slow_consumer_timeout=args.slow_consumer_timeout,
            drain_timeout=args.drain_timeout,
            handshake_max_frame_size=handshake_max_frame_size,
            write_high_water=args.write_high_water,
            send_buffer_size=args.send_buffer_size,
            retry_after=args.retry_after,
            slow_consumer_min_rate=args.slow_consumer_min_rate,
            keep_latest_streams=args.keep_latest_streams,
            flow_control=args.flow_control,
            pace_min_rate=args.pace_min_rate,
            max_publisher_pause=args.max_publisher_pause,
            max_total_queue_bytes=args.max_total_queue_bytes,
            max_handshaking=args.max_handshaking,
            max_unknown_formats=args.max_unknown_formats,
            max_groups_per_client=args.max_groups_per_client,
            max_groups=args.max_groups,
            max_group_name_length=args.max_group_name_length,
            max_presence_members=args.max_presence_members,
            last_value_groups=tuple(args.last_value_groups),
            last_values_max_count=args.last_values_max_count,
            last_values_max_bytes=args.last_values_max_bytes,
            last_values_total_max_bytes=args.last_values_total_max_bytes,
        )
    except ValueError as err:
        parser.error(_option_names(str(err)))


class _WorkerTag(logging.Filter):
    """Add ``worker`` to every record: a JSON field, and ``[worker i]`` in text lines."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        """Tag ``record`` with the worker index; keep it."""
        record.worker = self.index
        return True


def _start_logging(args: argparse.Namespace, worker: int | None = None) -> None:
    # The workers of --workers share one stderr: each line says whose it is.
    tag = "" if worker is None else "[worker %(worker)d] "
    handler = logging.StreamHandler()
    if worker is not None:
        handler.addFilter(_WorkerTag(worker))
    if args.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)s {tag}%(name)s: %(message)s")
        )
    logging.basicConfig(level=getattr(logging, args.log_level), handlers=[handler])


#: LogRecord attributes that are not fields a log call added with ``extra=``.
_RECORD_ATTRS: Final = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the record's ``extra=``
    fields (``event``, ``client``, ``reason``...), the form log collectors expect."""

    def format(self, record: logging.LogRecord) -> str:
        """Return ``record`` as one line of JSON."""
        entry: dict[str, Any] = {
            "time": record.created,
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRS and not key.startswith("_"):
                entry[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _loop_name(loop: asyncio.AbstractEventLoop) -> str:
    cls = type(loop)
    return f"{cls.__module__}.{cls.__qualname__}"


async def _serve(
    args: argparse.Namespace,
    config: ServerConfig,
    tls: ssl.SSLContext | None,
    cluster: ClusterConfig | None = None,
    worker: int | None = None,
) -> int:
    loop = asyncio.get_running_loop()
    options: dict[str, Any] = {}
    if cluster is not None:
        options["cluster"] = cluster
    if worker is not None:
        options["reuse_port"] = True  # the port its supervisor reserved, shared by all workers
    try:
        server = await start_server(args.host, args.port, config=config, ssl=tls, **options)
    except OSError as err:
        print(f"trame-serve: cannot listen on {args.host}:{args.port}: {err}", file=sys.stderr)
        return 1
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    lifeline = None
    if worker is not None:
        from .workers import watch_supervisor

        lifeline = await watch_supervisor(stop.set)
    sockname = server.sockets[0].getsockname()
    host = sockname[0]
    shown = f"[{host}]" if ":" in host else host
    scheme = " (TLS)" if tls is not None else ""
    # The LAN address only where clients on the LAN can reach it: not for a loopback server.
    lan = "" if _is_loopback(host) else f" lan {get_host_ip()}"
    print(f"listening on {shown}:{sockname[1]}{scheme}{lan}", flush=True)
    metrics = None
    if args.metrics is not None:
        from .metrics import serve_metrics

        try:
            # Beyond loopback the endpoint asks for the relay's token too (Bearer).
            guard = None if _is_loopback(args.metrics[0]) else config.token
            metrics = await serve_metrics(server, *_metrics_address(args, worker), token=guard)
        except OSError as err:
            print(
                f"trame-serve: --metrics {args.metrics[0]}:{args.metrics[1]}: {err}",
                file=sys.stderr,
            )
            server.close()
            await server.wait_closed()
            return 1
        mhost = args.metrics[0]
        mshown = f"[{mhost}]" if ":" in mhost else mhost
        print(f"metrics on http://{mshown}:{metrics.port}/metrics", flush=True)
    # Logging starts after the lines that say where to connect, so that they come first.
    _start_logging(args, worker)
    logger.info("event loop: %s", _loop_name(loop))
    if cluster is not None:
        logger.info(
            "cluster %s through %s, node index %s",
            cluster.name,
            ",".join(cluster.urls),
            "auto" if cluster.node_index is None else cluster.node_index,
        )
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        if lifeline is not None:
            lifeline.close()
        if metrics is not None:
            metrics.close()
            await metrics.wait_closed()
        server.close()
        await server.wait_closed()
    return 0


def _metrics_address(args: argparse.Namespace, worker: int | None) -> tuple[str, int]:
    """Where to serve metrics: ``--metrics``, its port plus i for worker i (0 stays 0)."""
    host, port = args.metrics
    if worker is not None and port != 0:
        port += worker
    return host, port


#: ClusterConfig field names in its error messages, and the options that set them.
_CLUSTER_OPTIONS: Final = {
    "node_index": "--node-index",
    "heartbeat_interval": "--cluster-heartbeat",
    "cluster name": "--cluster-name",
}


def _cluster_config(
    args: argparse.Namespace,
    parser: argparse.ArgumentParser,
    urls: Sequence[str],
    index: int | None,
) -> ClusterConfig:
    heartbeat = args.cluster_heartbeat
    d = ClusterConfig()
    try:
        return ClusterConfig(
            urls=tuple(urls),
            name=args.cluster_name,
            node_index=index,
            heartbeat_interval=heartbeat,
            # The default ratio: a server is gone after three heartbeats missed.
            dead_after=heartbeat * (d.dead_after / d.heartbeat_interval),
        )
    except ValueError as err:
        message = str(err)
        for field, option in _CLUSTER_OPTIONS.items():
            message = message.replace(field, option)
        parser.error(message)


def _check_cluster_options(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Refuse cluster options that would do nothing, and a cluster without its extra."""
    clustered = args.cluster is not None or args.workers > 1
    if not clustered:
        d = ClusterConfig()
        for option, given in (
            ("--cluster-name", args.cluster_name != d.name),
            ("--node-index", args.node_index is not None),
            ("--cluster-heartbeat", args.cluster_heartbeat != d.heartbeat_interval),
        ):
            if given:
                parser.error(f"{option} needs --cluster URL (or --workers N)")
        return
    what = "--cluster" if args.cluster is not None else f"--workers {args.workers}"
    try:
        importlib.import_module("nats")
    except ImportError:
        parser.error(
            f"{what} needs the NATS client, which is not installed: "
            f"pip install 'trame-async[cluster]'"
        )
    if args.workers > 1:
        if not hasattr(socket, "SO_REUSEPORT"):
            parser.error(f"{what} needs SO_REUSEPORT, which this system lacks (Linux, BSD, macOS)")
        base = args.node_index or 0
        if base + args.workers > MAX_NODES:
            parser.error(
                f"--node-index {base} with --workers {args.workers}: worker indexes would pass "
                f"{MAX_NODES - 1}"
            )
        if args.cluster is None:
            from .cluster.embedded import find_nats_server

            try:
                find_nats_server()
            except FileNotFoundError as err:
                parser.error(f"{what} runs its own nats-server unless --cluster names one: {err}")


def _supervise(argv: Sequence[str], args: argparse.Namespace) -> int:
    """Run ``--workers N``: reserve the port, start and watch the workers (and NATS)."""
    from .workers import Supervisor, reserve_port

    _start_logging(args)
    try:
        reserved = reserve_port(args.host, args.port)
    except OSError as err:
        print(f"trame-serve: cannot listen on {args.host}:{args.port}: {err}", file=sys.stderr)
        return 1
    try:
        supervisor = Supervisor(
            argv,
            count=args.workers,
            port=reserved[0].getsockname()[1],
            cluster_urls=args.cluster,
            # A worker's graceful shutdown takes up to --drain-timeout, then leaves NATS.
            stop_timeout=args.drain_timeout + 10.0,
        )
        return asyncio.run(supervisor.run())
    finally:
        for sock in reserved:
            sock.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``trame-serve``; return the exit status (0 after a clean shutdown)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    given = getattr(args, "token", None)
    token = given if given is not None else os.environ.get(TOKEN_ENV) or None
    metrics_host = args.metrics[0] if args.metrics else None
    if (
        metrics_host is not None
        and not token
        and not args.allow_anonymous
        and not _is_loopback(metrics_host)
    ):
        parser.error(
            f"--metrics {metrics_host}: refusing to show who is connected on a non-loopback "
            f"address without a token; set --token (or ${TOKEN_ENV}) or --allow-anonymous"
        )
    if not token and not args.allow_anonymous and not _is_loopback(args.host):
        print(
            f"trame-serve: refusing to listen on non-loopback address {args.host} without a "
            f"token: anyone who can reach it could join. Set --token (or ${TOKEN_ENV}), or pass "
            f"--allow-anonymous if anonymous access is really wanted.",
            file=sys.stderr,
        )
        return 2
    config = _config(args, parser, token)
    tls = _tls_context(args, parser)
    _check_cluster_options(args, parser)
    worker = None
    if args.workers > 1:
        from .workers import worker_index

        worker = worker_index()
        if worker is None:
            # Check here what each worker would refuse, so that it is said once.
            _cluster_config(args, parser, args.cluster or ("127.0.0.1",), args.node_index)
            return _supervise(argv, args)
    cluster = None
    if args.cluster is not None:
        index = args.node_index if worker is None else (args.node_index or 0) + worker
        cluster = _cluster_config(args, parser, args.cluster, index)
    runner_kwargs: dict[str, Any] = {"loop_factory": _loop_factory(args.loop)}
    with asyncio.Runner(**runner_kwargs) as runner:
        return runner.run(_serve(args, config, tls, cluster, worker))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

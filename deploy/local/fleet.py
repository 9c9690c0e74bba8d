"""A local fleet: N `refinery serve` replicas and nginx with pair affinity, on loopback, in one command.

    python -m deploy.local.fleet [--replicas 3] [--port 50050] [--budget 0] [--round-robin] [--pair M+R]...
    make fleet                                   # the same with the defaults

It prints the front address (point any client or `refinery generate --server` at it), where the ring puts
each `--pair`, and with `--admin` the file holding this run's admin token (REFINERY_ADMIN_TOKEN, drawn per run;
without it administration is off), then runs until Ctrl-C or SIGTERM, which stop nginx and then every replica
(each drains).

Importable: tests and the benchmark drive it as `with Fleet(FleetSettings(...)) as fleet: ...`.

The replicas share one model cache folder. On one machine that is safe and cheap: the cache's locks are
`flock`s, which a local file system honours, so the tiny models are built (or a real one downloaded) once for
all. On Kubernetes each pod gets its own cache volume instead (deploy/README.md, "The model cache").
"""

from __future__ import annotations

import argparse
import secrets
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType

from deploy.local.nginx import Nginx
from deploy.local.replica import Replica, ReplicaSpec
from deploy.local.ring import Ring
from refinery.client import pair_affinity


@dataclass(frozen=True)
class FleetSettings:
    replicas: int = 3
    host: str = "127.0.0.1"
    # The front (nginx). 0: any free port.
    front_port: int = 0
    # Each replica's gRPC port, which is also its name on nginx's ring; empty: free ports.
    ports: tuple[int, ...] = ()
    metrics_ports: tuple[int, ...] = ()
    # Model memory per replica ("0": the server's default, RAM less 25 %).
    budget: str = "0"
    grace_s: float = 30.0
    max_batch: int = 4
    # False: round-robin instead of the consistent hash (the benchmark's baseline).
    affinity: bool = True
    # Logs, nginx's files and (unless `cache_dir`) the shared model cache; a temporary folder if None.
    run_dir: Path | None = None
    cache_dir: Path | None = None
    # Free ports are drawn until the ring puts at most `per_replica` of these pair keys on any one replica:
    # the "replica names" lever an operator has, applied for a known set of pairs (see `Ring`).
    spread: tuple[str, ...] = ()
    per_replica: int = 0
    nginx_workers: str = "1"
    env: dict[str, str] = field(default_factory=dict)
    # Draw an admin token for the replicas (RUN_DIR/admin-token); without one the fleet cannot be administered.
    admin: bool = False


class Fleet:
    def __init__(self, settings: FleetSettings) -> None:
        self.settings = settings
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if settings.run_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="refinery-fleet-")
            self.run_dir = Path(self._tmp.name)
        else:
            self.run_dir = settings.run_dir
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.cache_dir = settings.cache_dir or self.run_dir / "cache"
        # nginx reaches every replica from loopback, so loopback proves nothing about a caller: without an admin
        # token administration is off. `admin` draws one per run (or takes the one `env` brings), kept in an
        # owner-only file; a server with a token wants one for Generate too (README, "Security").
        self.admin_token: str | None = settings.env.get("REFINERY_ADMIN_TOKEN")
        if settings.admin and not self.admin_token:
            self.admin_token = secrets.token_urlsafe(32)
        self.admin_token_file = self.run_dir / "admin-token"
        replica_env = dict(settings.env)
        if self.admin_token:
            self.admin_token_file.touch(mode=0o600)
            self.admin_token_file.chmod(0o600)
            self.admin_token_file.write_text(self.admin_token + "\n")
            replica_env["REFINERY_ADMIN_TOKEN"] = self.admin_token
        ports, metrics_ports, front_port = self._ports()
        self.replicas = [
            Replica(
                ReplicaSpec(
                    name=f"replica-{i}",
                    host=settings.host,
                    port=port,
                    metrics_port=metrics_ports[i],
                    cache_dir=self.cache_dir,
                    log_path=self.run_dir / f"replica-{i}.log",
                    budget=settings.budget,
                    grace_s=settings.grace_s,
                    max_batch=settings.max_batch,
                    env=replica_env,
                )
            )
            for i, port in enumerate(ports)
        ]
        self.front = f"{settings.host}:{front_port}"
        self.ring = Ring.nginx([r.address for r in self.replicas])
        self.nginx = Nginx(
            listen=self.front,
            servers=[r.address for r in self.replicas],
            run_dir=self.run_dir / "nginx",
            affinity=settings.affinity,
            workers=settings.nginx_workers,
        )

    def _ports(self) -> tuple[list[int], list[int], int]:
        s = self.settings
        if s.ports:
            if len(s.ports) != s.replicas or len(s.metrics_ports) != s.replicas:
                raise ValueError("give one gRPC port and one metrics port per replica")
            return list(s.ports), list(s.metrics_ports), s.front_port or free_ports(s.host, 1)[0]
        for _ in range(200):
            ports = free_ports(s.host, 2 * s.replicas + 1)
            grpc_ports = ports[: s.replicas]
            if not s.spread or _fits(Ring.nginx([f"{s.host}:{p}" for p in grpc_ports]), s.spread, s.per_replica):
                front = s.front_port or ports[-1]
                return grpc_ports, ports[s.replicas : 2 * s.replicas], front
        raise RuntimeError(f"no free ports put at most {s.per_replica} of {len(s.spread)} pairs on each replica")

    def start(self, timeout_s: float = 180.0) -> None:
        """Start every replica (in parallel: each imports torch), wait until all are ready, then nginx."""
        try:
            for replica in self.replicas:
                replica.start()
            for replica in self.replicas:
                replica.wait_ready(timeout_s)
            self.nginx.start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """nginx first (no new calls reach a replica), then every replica in parallel: SIGTERM, each drains."""
        self.nginx.stop()
        stoppers = [threading.Thread(target=r.stop) for r in self.replicas]
        for thread in stoppers:
            thread.start()
        for thread in stoppers:
            thread.join()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def owner(self, key: str, down: Sequence[Replica] = ()) -> Replica:
        """The replica nginx sends pair key `key` to (with `down` replicas failed)."""
        address = self.ring.owner(key, [r.address for r in down])
        return next(r for r in self.replicas if r.address == address)

    def by_address(self, address: str) -> Replica:
        return next(r for r in self.replicas if r.address == address)

    def __enter__(self) -> Fleet:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def free_ports(host: str, count: int) -> list[int]:
    """`count` distinct ports free on `host` right now (all held open until every one is drawn)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _fits(ring: Ring, keys: Sequence[str], per_replica: int) -> bool:
    counts: dict[str, int] = {}
    for server in ring.owners(keys).values():
        counts[server] = counts.get(server, 0) + 1
    return max(counts.values(), default=0) <= per_replica


# ---- the command ------------------------------------------------------------------------------------------


def _parse_pair(text: str) -> str:
    model, sep, refiner = text.partition("+")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected MODEL+REFINER (either may be empty), got {text!r}")
    return pair_affinity(model, refiner)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.local.fleet",
        description="N `refinery serve` replicas behind nginx with pair affinity, on loopback, until Ctrl-C.",
    )
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--host", default="127.0.0.1", help="loopback address for everything (default 127.0.0.1)")
    parser.add_argument(
        "--port",
        type=int,
        default=50050,
        help="the front (nginx); replicas use the next N ports and metrics PORT+100+1.. (default 50050)",
    )
    parser.add_argument("--budget", default="0", help="model memory per replica, e.g. 2GiB (default: RAM less 25%%)")
    parser.add_argument("--grace", type=float, default=30.0, help="seconds a replica drains on SIGTERM")
    parser.add_argument("--round-robin", action="store_true", help="no pair affinity (for comparison)")
    parser.add_argument(
        "--admin", action="store_true", help="draw an admin token for this run (then every call needs it)"
    )
    parser.add_argument("--run-dir", type=Path, help="logs and nginx files (default: a temporary folder)")
    parser.add_argument("--cache-dir", type=Path, help="the replicas' shared model cache (default: RUN_DIR/cache)")
    parser.add_argument(
        "--pair",
        action="append",
        default=[],
        type=_parse_pair,
        metavar="MODEL+REFINER",
        help="show which replica serves this pair (repeatable; '+' = the server's defaults)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    n = args.replicas
    settings = FleetSettings(
        replicas=n,
        host=args.host,
        front_port=args.port,
        # Fixed ports, so the ring (which places replicas by name) is the same on every run.
        ports=tuple(args.port + 1 + i for i in range(n)),
        metrics_ports=tuple(args.port + 101 + i for i in range(n)),
        budget=args.budget,
        grace_s=args.grace,
        affinity=not args.round_robin,
        run_dir=args.run_dir,
        cache_dir=args.cache_dir,
        admin=args.admin,
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    fleet = Fleet(settings)
    print(f"starting {n} replicas and nginx; logs in {fleet.run_dir}", flush=True)
    with fleet:
        for replica in fleet.replicas:
            print(f"  {replica.spec.name}  grpc {replica.address}  metrics http://{replica.spec.host}:"
                  f"{replica.spec.metrics_port}/metrics", flush=True)  # fmt: skip
        for key in args.pair:
            print(f"  pair {key} -> {fleet.owner(key).spec.name}", flush=True)
        policy = "round-robin" if args.round_robin else "pair affinity (header refinery-pair)"
        print(f"front {fleet.front} ({policy}); Ctrl-C to stop", flush=True)
        if fleet.admin_token:
            print(f"administration and generation: REFINERY_ADMIN_TOKEN_FILE={fleet.admin_token_file}", flush=True)
        else:
            print("administration is off (--admin draws a token for it)", flush=True)
        stop.wait()
        print("stopping", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

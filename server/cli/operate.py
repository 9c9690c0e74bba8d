"""`refinery status`, `refinery pin|unpin BASE[+REFINER]` and `refinery proto`: a running server's state and
pinned pairs (ServerService), and the contract's .proto files for generating clients in other languages.

    refinery status [--server ADDR]                what each device holds and runs; the queue
    refinery pin BASE[+REFINER] [--server ADDR]    load a pair on every device and keep it (PinPair)
    refinery unpin BASE[+REFINER] [--server ADDR]  let it be evicted again (UnpinPair)
    refinery proto --out DIR                       write the .proto files (refinery/v1 and google/rpc)
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path

from modelstore.units import format_bytes
from refinery.client import DEFAULT_TARGET, AsyncClient, RefineryError, ServerStatus
from refinery.contract import write_protos
from server.cli import connect, options, serve
from server.cli.terminal import print_table, report_failure
from server.core.domain import PairKey


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser], env: Mapping[str, str]) -> None:
    status = commands.add_parser("status", help="what a running server's devices hold and run, and its queue")
    pin = commands.add_parser("pin", help="load a pair on every device of a running server and keep it there")
    unpin = commands.add_parser("unpin", help="let a pinned pair be evicted again")
    for parser in (pin, unpin):
        parser.add_argument(
            "pair",
            type=options.argument_type(PairKey.parse),
            metavar="BASE[+REFINER]",
            help="e.g. civitai:101055@128078+civitai:101055@128080",
        )
    for parser in (status, pin, unpin):
        connect.add_flags(parser, env, what=f"default: {DEFAULT_TARGET}")
        serve.add_log_flags(parser, env)
    proto = commands.add_parser("proto", help="write the contract's .proto files, for generating clients")
    proto.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder to write them under")
    serve.add_log_flags(proto, env)


async def run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    if args.command == "proto":
        for path in write_protos(args.out):
            print(path)
        return 0
    address = args.server or DEFAULT_TARGET
    # The client sends the admin token for pin and unpin, the generation token for status.
    async with connect.client(address, args, env) as client:
        try:
            if args.command == "status":
                _print_status(await client.status())
            else:
                await _pin(client, args.pair, pin=args.command == "pin")
        except RefineryError as err:
            return report_failure(err)
    return 0


async def _pin(client: AsyncClient, pair: PairKey, *, pin: bool) -> None:
    if pin:
        await client.pin_pair(pair.base.canonical, "" if pair.refiner is None else pair.refiner.canonical)
    else:
        await client.unpin_pair(pair.base.canonical, "" if pair.refiner is None else pair.refiner.canonical)
    print(f"{'pinned' if pin else 'unpinned'} {pair} on every device")


def _print_status(status: ServerStatus) -> None:
    queue = status.queue
    by_priority = ", ".join(f"{n} at priority {p}" for p, n in sorted(queue.depth_by_priority.items()))
    print(f"queue: {queue.depth} of {queue.max_queue} waiting{f' ({by_priority})' if by_priority else ''}")
    print(f"running: {status.jobs_running} request(s)")
    for device in status.devices:
        allocated = f", {format_bytes(device.allocated_bytes)} allocated" if device.allocated_bytes else ""
        print(
            f"device {device.name}: {format_bytes(device.resident_bytes)} of {format_bytes(device.budget_bytes)} "
            f"budget resident{allocated}; {device.jobs_running} running"
        )
        rows = [("  PAIR", "SIZE", "ACTIVE", "PINNED", "LAST USED (UTC)")]
        for pair in device.pairs:
            name = pair.model + (f"+{pair.refiner_model}" if pair.refiner_model else "")
            last_used = pair.last_used.strftime("%Y-%m-%d %H:%M:%S")
            pinned = "yes" if pair.pinned else "no"
            rows.append((f"  {name}", format_bytes(pair.bytes), str(pair.active_jobs), pinned, last_used))
        if device.pairs:
            print_table(rows)
        else:
            print("  no pairs resident")

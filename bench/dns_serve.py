"""Run the DNS service alone (no supervisor) for bench/dns.sh: `python bench/dns_serve.py CONFIG RULES`.

The audit sink only counts records: the benchmark measures the DNS path, and the supervisor's
audit writer is a separate process in `proxyvm run`. Prints "ready" once listening."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
from pathlib import Path
from typing import Any

# bench/ holds other benchmarks (bench/policy.py) that would shadow the packages of the same name
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from policy import load_policy  # noqa: E402
from policy.source import load_yaml  # noqa: E402
from protocols.base import ServiceContext, StaticGuests  # noqa: E402
from protocols.dns.service import DNSService  # noqa: E402
from protocols.dns.settings import parse  # noqa: E402


class CountingAudit:
    def __init__(self) -> None:
        self.count = 0

    def emit(self, record: dict[str, Any]) -> None:
        self.count += 1


async def main(config: Path, rules: Path) -> None:
    node = load_yaml(config)
    settings = parse(node.get_map()["dns"], config.parent)
    ctx = ServiceContext(settings=settings, engine=load_policy(rules), audit=CountingAudit(),
                         guests=StaticGuests({}), log=logging.getLogger("bench.dns"))
    svc = DNSService(ctx)
    await svc.start()
    gc.freeze()  # the start-up objects never become garbage; keep the collector off them
    print("ready", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    await svc.drain(1)


if __name__ == "__main__":
    import os

    logging.basicConfig(level=logging.WARNING)
    prof_out = os.environ.get("PROXYVM_BENCH_PROFILE")  # write cProfile stats here on exit
    if prof_out:
        import cProfile

        prof = cProfile.Profile()
        prof.runcall(asyncio.run, main(Path(sys.argv[1]), Path(sys.argv[2])))
        prof.dump_stats(prof_out)
    else:
        asyncio.run(main(Path(sys.argv[1]), Path(sys.argv[2])))

"""Config push: how fast a published release is in force on 100 subscribers, and that none misses one.

    python bench/config_push.py [--subscribers 100] [--publishes 20] [--out bench/results/config_push.json]

One `moorage serve` process on 127.0.0.1 (a fake embedding model, a fresh temporary home) serves the
config center; N subscribers long-poll it over HTTP with an operator key, each with its own
connection and snapshot folder, as N server or worker processes would; they run in a few child
processes (--processes), so that what each does on receipt (parse, validate, merge its settings)
is not queued behind the others on one event loop. Releases are published
the way `moorage config publish` does (a ConfigCenter on the same catalog, another process than the
server), one after the other: each waits until every subscriber has it, and its publish -> applied
(the subscriber's apply returned) and publish -> reported (the center has its report) times are kept.
p50 and p99 are over every (publish, subscriber) pair; the target is p99 <= 1 s. "reported" is when the
server accepted the report (202): it writes reports after the configs it is handing out. A first
release warms the server up and is not counted.

Two drops, outside those numbers:
  (cut)     one subscriber talks through a TCP proxy; mid-hold its connection is reset and refused
            while a release is published, then let through again;
  (restart) the server is killed (SIGKILL) with every long-poll held, a release is published while it
            is down, and it is started again on the same port.
Afterwards every subscriber must have applied every published release, in order: "missed" counts the
(subscriber, release) pairs it did not. The header names the CPU, its ISA flags, torch and its threads
(no model computes here: dtype n/a), and the share of the machine other processes took meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))  # tests/services/tcp_proxy.py: the proxy whose connections can be cut
from cpuload import OtherLoad  # noqa: E402
from serving import ISA_FLAGS, free_port, machine, wait_ready  # noqa: E402

from moorage.config import load_settings  # noqa: E402
from moorage.configcenter.releases import ConfigCenter, Instance  # noqa: E402
from moorage.configcenter.subscriber import HttpSource, Subscriber  # noqa: E402
from moorage.registry import Registry  # noqa: E402
from moorage.runtime import make_fake_model  # noqa: E402
from moorage.security.keys import KeyStore  # noqa: E402

from tests.services.tcp_proxy import CuttableProxy  # noqa: E402

WAIT_S = 60.0  # per release: a subscriber that has not applied it by then counts as missing it


class Server:
    """`moorage serve` on a fixed port, killed and started again on the same port."""

    def __init__(self, env: dict, port: int) -> None:
        self.env, self.port = env, port
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "moorage", "serve", "-m", "emb", "--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_ready(self.port, "/readyz", self.proc)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill()


class TimedSource(HttpSource):
    """HttpSource that tells the parent when each config arrived and when each report reached the center."""

    def __init__(self, url: str, key: str, index: int, events) -> None:
        super().__init__(url, key)
        self.index, self.events = index, events

    async def watch(self, instance: Instance, after: int, hold_s: float):
        found = await super().watch(instance, after, hold_s)
        if found is not None:
            self.events.put(("received", self.index, found.revision, time.monotonic()))
        return found

    async def report(self, instance: Instance, revision: int, status: str, reason: str = "") -> None:
        await super().report(instance, revision, status, reason)
        self.events.put(("reported", self.index, revision, time.monotonic()))


def subscribers_process(env: dict, urls: dict[int, str], key: str, events, stop) -> None:
    """A child process running the subscribers `urls` names (index -> the URL it long-polls), each with
    its own snapshot folder, until `stop` is set. Times are CLOCK_MONOTONIC: one clock for every process."""

    async def main() -> None:
        settings = load_settings(environ=env)
        subscribers = []
        for index, url in urls.items():
            config = settings.config.model_copy(update={"snapshot_dir": Path(settings.home) / "snapshots" / str(index)})

            def apply(new, effective, index=index) -> None:
                events.put(("applied", index, (new.serve.max_batch_size, effective.revision), time.monotonic()))

            instance = Instance(id=f"bench-{index}", group="servers", labels={"n": str(index)})
            source = TimedSource(url, key, index, events)
            sub = Subscriber(settings.model_copy(update={"config": config}), instance, apply, source=source)
            subscribers.append(sub)
        await asyncio.gather(*(sub.start() for sub in subscribers))
        events.put(("started", len(subscribers), None, time.monotonic()))
        await asyncio.to_thread(stop.wait)
        await asyncio.gather(*(sub.stop() for sub in subscribers), return_exceptions=True)

    asyncio.run(main())


class Member:
    """What the parent learnt of one subscriber: each applied batch size with its time, when each
    config arrived and when each report reached the center."""

    def __init__(self) -> None:
        self.applied: list[tuple[int, int, float]] = []  # (batch size, revision, when)
        self.received: dict[int, float] = {}
        self.reported: dict[int, float] = {}

    def has(self, size: int) -> bool:
        return any(s == size for s, _, _ in self.applied)

    def when(self, size: int) -> tuple[float, int] | None:
        return next(((t, r) for s, r, t in self.applied if s == size), None)


class Fleet:
    """The subscribers, spread over `processes` child processes as they would be over many hosts: each
    parses, validates and merges its config with its own CPU, not on one shared event loop."""

    def __init__(self, env: dict, urls: list[str], key: str, processes: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.members = [Member() for _ in urls]
        self.events = ctx.Queue()
        self.stop_event = ctx.Event()
        self.started = 0
        shares = [dict(list(enumerate(urls))[i::processes]) for i in range(processes)]
        self.procs = [
            ctx.Process(target=subscribers_process, args=(env, share, key, self.events, self.stop_event))
            for share in shares
            if share
        ]

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._reader = threading.Thread(target=self._read, args=(loop,), daemon=True)
        self._reader.start()
        for proc in self.procs:
            proc.start()
        if not await until(lambda: self.started == len(self.members), WAIT_S * 3):
            raise SystemExit("the subscribers did not start")

    def _read(self, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            event = self.events.get()
            if event is None:
                return
            loop.call_soon_threadsafe(self._record, event)

    def _record(self, event: tuple) -> None:
        kind, index, what, when = event
        if kind == "started":
            self.started += index
        elif kind == "applied":
            self.members[index].applied.append((*what, when))
        else:
            getattr(self.members[index], kind).setdefault(what, when)

    def stop(self) -> None:
        self.stop_event.set()
        for proc in self.procs:
            proc.join(60)
            if proc.is_alive():
                proc.kill()
        self.events.put(None)


def publish(center: ConfigCenter, size: int) -> tuple[float, int]:
    """Publish a release setting serve.max_batch_size; (the time just before publishing, its revision)."""
    center.edit_draft("global", {"serve": {"max_batch_size": size}}, author="bench")
    started = time.monotonic()
    center.publish("global", author="bench", comment=f"batches of {size}")
    return started, center.revision()


async def until(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.005)
    return True


async def push(center: ConfigCenter, members: list[Member], size: int, samples: dict) -> dict:
    started, revision = await asyncio.to_thread(publish, center, size)
    complete = await until(lambda: all(m.has(size) for m in members), WAIT_S)
    await settled(center, members, size, revision)
    applied = [seen[0] - started for m in members if (seen := m.when(size)) is not None]
    samples["applied"] += applied
    samples["received"] += [m.received[revision] - started for m in members if revision in m.received]
    samples["reported"] += [m.reported[revision] - started for m in members if revision in m.reported]
    return {"size": size, "revision": revision, "complete": complete, "applied": percentiles(applied)}


async def settled(center: ConfigCenter, members: list[Member], size: int, revision: int) -> None:
    """Every subscriber applied and reported `revision`, and the server wrote every report: the next
    release starts from a quiet server, as releases minutes apart do."""
    await until(lambda: all(m.has(size) and revision in m.reported for m in members), WAIT_S)
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        status = await asyncio.to_thread(center.status)
        if sum(1 for i in status["instances"] if i["revision"] >= revision) > len(members):  # and the server's own
            return
        await asyncio.sleep(0.05)


async def cut_one(center: ConfigCenter, member: Member, proxy: CuttableProxy, size: int) -> dict:
    """Reset the proxied subscriber's held long-poll, publish while it is refused, then let it through."""
    await until(lambda: proxy.open_connections >= 1, WAIT_S)
    cut = proxy.cut()
    _, revision = await asyncio.to_thread(publish, center, size)
    resumed = time.monotonic()
    proxy.resume()
    got = await until(lambda: member.has(size), WAIT_S)
    return {
        "connections_cut": cut,
        "revision": revision,
        "got_it": got,
        "after_resume_s": _since(member, size, resumed),
    }


async def restart(center: ConfigCenter, members: list[Member], server: Server, size: int) -> dict:
    """Kill the server with every long-poll held, publish while it is down, start it again."""
    server.kill()
    _, revision = await asyncio.to_thread(publish, center, size)
    await asyncio.to_thread(server.start)
    ready = time.monotonic()
    complete = await until(lambda: all(m.has(size) for m in members), WAIT_S)
    last = max((m.when(size) or (float("nan"), 0))[0] for m in members)
    return {"revision": revision, "complete": complete, "all_applied_after_ready_s": round(last - ready, 3)}


def _since(member: Member, size: int, t0: float) -> float | None:
    seen = member.when(size)
    return round(seen[0] - t0, 3) if seen else None


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    q = statistics.quantiles(ordered, n=100, method="inclusive") if len(ordered) > 1 else ordered * 99
    return {"n": len(ordered), "p50_s": round(q[49], 4), "p99_s": round(q[98], 4), "max_s": round(ordered[-1], 4)}


def missed(members: list[Member], sizes: list[int]) -> int:
    """(subscriber, release) pairs not applied, or applied out of order."""
    count = 0
    for m in members:
        got = [s for s, _, _ in m.applied if s in sizes]
        count += len(set(sizes) - set(got)) + (0 if got == sorted(got, key=sizes.index) else 1)
    return count


async def run(args, settings, env: dict, key: str) -> dict:
    port = free_port()
    server = Server(env, port)
    await asyncio.to_thread(server.start)
    url = f"http://127.0.0.1:{port}"
    proxy = CuttableProxy("127.0.0.1", port)
    await proxy.start()
    center = ConfigCenter.from_settings(settings)
    fleet = Fleet(env, [proxy.url] + [url] * (args.subscribers - 1), key, args.processes)
    members = fleet.members
    samples: dict[str, list[float]] = {"received": [], "applied": [], "reported": []}
    out: dict = {"publishes": []}
    sizes: list[int] = []
    # the machine's other load over the publishes before the first drop (the restart changes the server's pid)
    load = OtherLoad([server.proc.pid] if server.proc else [])
    try:
        await fleet.start()
        load.pids += [str(p.pid) for p in fleet.procs]
        await settled(center, members, 1, (await asyncio.to_thread(publish, center, 1))[1])  # warm-up, not counted
        load.__enter__()
        for i in range(args.publishes):
            size = 2 + i
            sizes.append(size)
            if i == args.publishes // 3:
                load.__exit__()
                out["cut"] = await cut_one(center, members[0], proxy, size)
                await settled(center, members, size, out["cut"]["revision"])
            elif i == 2 * args.publishes // 3:
                out["restart"] = await restart(center, members, server, size)
                await settled(center, members, size, out["restart"]["revision"])
            else:
                out["publishes"].append(await push(center, members, size, samples))
        out["other_load"] = load.share
        everyone = len(members) + 1  # and the server's own subscriber
        await until(lambda: center.status()["current"] == everyone, WAIT_S)  # reports are written after deliveries
        out["status"] = center.status()["summary"]
    finally:
        await asyncio.to_thread(fleet.stop)
        await proxy.stop()
        server.stop()
        center.close()
    out["received"] = percentiles(samples["received"])
    out["applied"] = percentiles(samples["applied"])
    out["reported"] = percentiles(samples["reported"])
    out["missed"] = missed(members, sizes)
    out["incomplete_publishes"] = sum(1 for p in out["publishes"] if not p["complete"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subscribers", type=int, default=100)
    parser.add_argument("--processes", type=int, default=4, help="child processes the subscribers run in")
    parser.add_argument("--publishes", type=int, default=20, help="releases published (two of them during drops)")
    parser.add_argument("--hold", type=float, default=25.0, help="config.hold_s of the server and subscribers")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "config_push.json"))
    args = parser.parse_args()
    if args.publishes < 6:
        parser.error("--publishes must be at least 6 (two drops among ordinary publishes)")
    home = Path(tempfile.mkdtemp(prefix="moorage-config-push-"))
    env = {
        **os.environ,
        "MOORAGE_HOME": str(home),
        "MOORAGE_CONFIG__HOLD_S": str(args.hold),
        "MOORAGE_SECURITY__AUDIT": "false",  # one audit row per long-poll is not what is measured here
        "HF_HUB_OFFLINE": "1",
    }
    settings = load_settings(environ=env)
    registry = Registry.from_settings(settings)
    registry.register(make_fake_model(home / "src-emb", "embed"), "emb", "embed")
    key = KeyStore(registry.catalog).create("operator", name="config-push")[1]
    registry.close()

    import torch

    torch.set_num_threads(1)
    m = machine("n/a (no model computes)", settings)
    print(f"cpu: {m['cpu']} ({m['cpus']} cpus), isa: {' '.join(m['isa']) or 'none of ' + ', '.join(ISA_FLAGS)}")
    print(f"torch {m['torch']}, {m['torch_threads']} threads; dtype {m['dtype']}")
    print(
        f"{args.subscribers} subscribers in {args.processes} processes, {args.publishes} releases, "
        f"hold {args.hold:g} s, one server on 127.0.0.1"
    )
    results = asyncio.run(run(args, settings, env, key))
    results |= {"machine": m, "subscribers": args.subscribers, "processes": args.processes}
    results |= {"releases": args.publishes, "hold_s": args.hold}
    a, r, g = results["applied"], results["reported"], results["received"]
    print(f"publish -> received  p50 {g.get('p50_s')} s  p99 {g.get('p99_s')} s  max {g.get('max_s')} s  (n={g['n']})")
    print(f"publish -> applied   p50 {a.get('p50_s')} s  p99 {a.get('p99_s')} s  max {a.get('max_s')} s  (n={a['n']})")
    print(f"publish -> reported  p50 {r.get('p50_s')} s  p99 {r.get('p99_s')} s  max {r.get('max_s')} s  (n={r['n']})")
    print(f"target p99 <= 1 s: {'met' if a.get('p99_s', 99) <= 1.0 else 'NOT met'}")
    print(f"cut connection: {results.get('cut')}")
    print(f"server restart: {results.get('restart')}")
    print(f"missed (subscriber, release) pairs: {results['missed']}; status: {results['status']}")
    share = results.get("other_load")
    print(f"other processes' share of the CPU meanwhile: {'n/a' if share is None else f'{share:.0%}'}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

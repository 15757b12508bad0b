"""Autoscaling, simulated: the HPA's algorithm driving real `moorage serve` processes on loopback, on
queue depth (the chart's policy) against CPU utilisation, under the same load ramp.

    python bench/autoscale.py [--steps 30] [--step-s 2] [--sync-s 30] [--peak 48] [--low 6]

Each replica is a real `moorage serve` process on 127.0.0.1 (one fake embedding model whose batch
takes --delay-ms x (1 + 0.1 x batch) of compute, batches of --max-batch-size; the compute is a sleep,
as a model on an accelerator leaves the host's CPU idle). The load is open-loop (requests sent at the
ramp's rate whatever the answers), spread round-robin over the ready replicas as a Service would:
--low requests/s, up to --peak, a plateau, down again. Every step the bench scrapes each replica's
/metrics and feeds the HorizontalPodAutoscaler v2 algorithm (kube-controller-manager's, replayed
here): desired = ceil(current x metric / target), skipped within the tolerance (0.1); pods without
metrics yet count as 0 when scaling up; then the stabilisation windows and the scale-up and
scale-down policies of the chart's `autoscaling.server.behavior` (deploy/helm/moorage/values.yaml),
between its minReplicas and min(maxReplicas, 4). The replicas it adds are started for real, and
serve once their /readyz answers; those it removes leave the rotation and get SIGTERM.

  queue depth: the chart's Pods metric, moorage_queue_depth summed per pod (prometheus-adapter's
               rule), target averageValue autoscaling.server.targetQueueDepth;
  CPU:         Resource cpu utilisation, the rate of moorage_process_cpu_seconds over the step
               divided by --cpu-request (cores), target --cpu-target percent.

Time is scaled: one step of --step-s real seconds is one HPA sync of --sync-s simulated seconds (the
windows and policy periods are read in simulated seconds: a 300 s scale-down window is 10 steps of
30 s), so a replica's start is counted in simulated seconds too. Per step the bench prints, for each
policy side by side, the offered rate, the ready replicas (+ starting), the metric, and the queue
wait the requests of that step saw (mean and p95 of moorage_queue_wait_seconds, from the histogram's
increase over the step); then a summary: time from the ramp's start until the replicas reached their
most, the worst step's queue wait (mean, p95), replica-seconds (simulated) and failed requests. Every
process is stopped by its pid at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from cpuload import OtherLoad  # noqa: E402

from moorage.registry import Registry  # noqa: E402
from moorage.runtime import make_fake_model  # noqa: E402

from tests.services.fleet import Fleet  # noqa: E402
from tests.services.servers import free_port  # noqa: E402

VALUES = ROOT / "deploy/helm/moorage/values.yaml"
MAX_PROCESSES = 4
TOLERANCE = 0.1  # kube-controller-manager's --horizontal-pod-autoscaler-tolerance default
# Kubernetes' behaviour where the chart sets none (autoscaling/v2 defaults)
DEFAULT_UP = {"stabilizationWindowSeconds": 0, "selectPolicy": "Max",
              "policies": [{"type": "Percent", "value": 100, "periodSeconds": 15},
                           {"type": "Pods", "value": 4, "periodSeconds": 15}]}  # fmt: skip
DEFAULT_DOWN = {"stabilizationWindowSeconds": 300, "selectPolicy": "Max",
                "policies": [{"type": "Percent", "value": 100, "periodSeconds": 15}]}  # fmt: skip


# -- the HPA v2 algorithm (pkg/controller/podautoscaler, replica_calculator.go and horizontal.go) -----
@dataclass
class Rules:
    window_s: float
    select: str  # Max, Min or Disabled
    policies: list[tuple[str, int, float]]  # (Pods | Percent, value, periodSeconds)

    @classmethod
    def of(cls, behavior: dict | None, default: dict) -> Rules:
        b = default | (behavior or {})
        policies = [(p["type"], int(p["value"]), float(p["periodSeconds"])) for p in b["policies"]]
        return cls(float(b["stabilizationWindowSeconds"]), b.get("selectPolicy", "Max"), policies)


@dataclass
class Hpa:
    min_replicas: int
    max_replicas: int
    up: Rules
    down: Rules
    recommendations: list[tuple[float, int]] = field(default_factory=list)
    up_events: list[tuple[float, int]] = field(default_factory=list)
    down_events: list[tuple[float, int]] = field(default_factory=list)

    @staticmethod
    def proposal(current: int, values: list[float], missing: int, target: float) -> int:
        """replica_calculator: the replicas the metric asks for. `values` are the pods with a metric;
        `missing` pods have none yet (starting): 0 when that would scale up, else left out."""
        if not values:
            return current
        ratio = sum(values) / len(values) / target
        if abs(ratio - 1) <= TOLERANCE:
            return current
        if missing and ratio > 1:  # a starting pod is assumed idle before scaling up further
            ratio = sum(values) / (len(values) + missing) / target
            if ratio <= 1 or abs(ratio - 1) <= TOLERANCE:
                return current
        return math.ceil(ratio * (len(values) + missing))

    def scale(self, now: float, current: int, proposed: int) -> int:
        """horizontal.go normalizeDesiredReplicasWithBehaviors: stabilise, then limit the rate."""
        self.recommendations.append((now, proposed))
        up = min(r for t, r in self.recommendations if t > now - self.up.window_s or t == now)
        down = max(r for t, r in self.recommendations if t > now - self.down.window_s or t == now)
        keep = max(self.up.window_s, self.down.window_s)
        self.recommendations = [(t, r) for t, r in self.recommendations if t > now - keep]
        desired = min(max(current, up), down)
        if desired > current:
            desired = min(desired, max(current, self._up_limit(now, current)), self.max_replicas)
        elif desired < current:
            desired = max(desired, min(current, self._down_limit(now, current)), self.min_replicas)
        desired = min(max(desired, self.min_replicas), self.max_replicas)
        if desired != current:
            events = self.up_events if desired > current else self.down_events
            events.append((now, abs(desired - current)))
        return desired

    @staticmethod
    def _changed(events: list[tuple[float, int]], now: float, period: float) -> int:
        return sum(n for t, n in events if t > now - period)

    def _up_limit(self, now: float, current: int) -> int:
        if self.up.select == "Disabled":
            return current
        pick, limits = (min if self.up.select == "Min" else max), []
        for kind, value, period in self.up.policies:
            start = current - self._changed(self.up_events, now, period) + self._changed(self.down_events, now, period)
            limits.append(start + value if kind == "Pods" else math.ceil(start * (1 + value / 100)))
        return pick(limits)

    def _down_limit(self, now: float, current: int) -> int:
        if self.down.select == "Disabled":
            return current
        pick, limits = (max if self.down.select == "Min" else min), []
        for kind, value, period in self.down.policies:
            start = current - self._changed(self.up_events, now, period) + self._changed(self.down_events, now, period)
            limits.append(start - value if kind == "Pods" else int(start * (1 - value / 100)))
        return pick(limits)


# -- replicas: real processes and what their /metrics said at the last step ----------------------
@dataclass
class Scrape:
    """The few numbers the bench reads from one /metrics answer (summed over models)."""

    t: float = field(default_factory=time.monotonic)
    depth: float = 0.0
    cpu: float | None = None  # None: the zero the counters of a new process start from
    wait_sum: float = 0.0
    wait_count: float = 0.0
    buckets: dict[float, float] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Scrape:
        from prometheus_client.parser import text_string_to_metric_families

        out = cls(cpu=0.0)
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "moorage_queue_depth":
                    out.depth += s.value
                elif s.name == "moorage_process_cpu_seconds":
                    out.cpu = (out.cpu or 0.0) + s.value
                elif s.name == "moorage_queue_wait_seconds_sum":
                    out.wait_sum += s.value
                elif s.name == "moorage_queue_wait_seconds_count":
                    out.wait_count += s.value
                elif s.name == "moorage_queue_wait_seconds_bucket":
                    le = float(s.labels["le"])
                    out.buckets[le] = out.buckets.get(le, 0.0) + s.value
        return out


@dataclass
class Pod:
    proc: subprocess.Popen
    url: str
    started: float  # simulated seconds
    is_ready: bool = False
    began: float = field(default_factory=time.monotonic)
    last: Scrape = field(default_factory=Scrape)  # the previous scrape


def p95(buckets: dict[float, float]) -> float:
    """The 95th percentile of a histogram's increase (cumulative buckets), interpolated in its bucket
    as Prometheus' histogram_quantile does."""
    total = buckets.get(math.inf, 0.0)
    if total <= 0:
        return 0.0
    rank, lower, below = 0.95 * total, 0.0, 0.0
    for le in sorted(buckets):
        if buckets[le] >= rank:
            if le == math.inf:
                return lower
            return lower + (le - lower) * (rank - below) / max(buckets[le] - below, 1e-9)
        lower, below = le, buckets[le]
    return lower


@dataclass
class Step:
    rate: float
    ready: int
    starting: int
    metric: float
    wait_mean: float
    wait_p95: float
    failed: int


class Run:
    """One policy over the whole ramp: its replicas, its HPA and its load."""

    def __init__(self, name: str, args, fleet: Fleet, hpa: Hpa, target: float) -> None:
        self.name, self.args, self.fleet, self.hpa, self.target = name, args, fleet, hpa, target
        self.pods: list[Pod] = []
        self.steps: list[Step] = []
        self.failed = 0
        self._next = 0
        self.other_share: float | None = None
        self.removed: list = []
        self.start_s: list[float] = []  # real seconds from each added process's start to its /readyz 200

    def add(self, now: float) -> None:
        port = free_port()
        proc = self.fleet.start(f"{self.name}-{port}", "serve", "--port", str(port), "--model", "emb")
        self.pods.append(Pod(proc, f"http://127.0.0.1:{port}", now))

    def remove(self) -> None:
        pod = max(self.pods, key=lambda p: (not p.is_ready, p.started))  # the starting or newest first
        self.pods.remove(pod)
        pod.proc.terminate()  # out of the rotation first; it finishes what it holds (reaped at the end)
        self.removed.append(pod.proc)

    async def send(self, client, i: int) -> None:
        ready = [p for p in self.pods if p.is_ready]
        pod = ready[self._next % len(ready)]
        self._next += 1
        try:
            r = await client.post(f"{pod.url}/v1/models/emb/predict", json={"inputs": [f"request {i}"]})
            self.failed += r.status_code != 200
        except Exception:  # noqa: BLE001 - a refused or reset connection is a failed request too
            self.failed += 1

    async def observe(self, client) -> tuple[list[float], int, float, float, float]:
        """Scrape every pod: (metric per pod that has one, pods without, wait sum, count, p95). A pod
        has no CPU rate before its second scrape (the HPA also leaves a starting pod's CPU out)."""
        values: list[float] = []
        missing, wait_sum, wait_count, buckets = 0, 0.0, 0.0, dict[float, float]()
        for pod in self.pods:
            try:
                if not pod.is_ready:
                    pod.is_ready = (await client.get(pod.url + "/readyz", timeout=2)).status_code == 200
                    if pod.is_ready and pod.started > 0:
                        self.start_s.append(time.monotonic() - pod.began)
                now = Scrape.parse((await client.get(pod.url + "/metrics", timeout=5)).text) if pod.is_ready else None
            except Exception:  # noqa: BLE001 - still starting: no metrics yet
                now = None
            if now is None:
                missing += 1
                continue
            last, pod.last = pod.last, now
            wait_sum += now.wait_sum - last.wait_sum
            wait_count += now.wait_count - last.wait_count
            for le, n in now.buckets.items():
                buckets[le] = buckets.get(le, 0.0) + n - last.buckets.get(le, 0.0)
            if self.name != "cpu":
                values.append(now.depth)
            elif last.cpu is not None and now.cpu is not None:
                values.append(100 * (now.cpu - last.cpu) / (now.t - last.t) / self.args.cpu_request)
            else:
                missing += 1
        return values, missing, wait_sum, wait_count, p95(buckets)


def ramp(args) -> list[float]:
    """Requests/s per step: low, up, plateau, down, low (the last third leaves room to scale down)."""
    n, low, peak = args.steps, args.low, args.peak
    up, plateau, down = max(n // 6, 1), max(n // 5, 1), max(n // 6, 1)
    start = max(n // 10, 1)
    rates = []
    for i in range(n):
        if i < start:
            rates.append(low)
        elif i < start + up:
            rates.append(low + (peak - low) * (i - start + 1) / up)
        elif i < start + up + plateau:
            rates.append(peak)
        elif i < start + up + plateau + down:
            rates.append(peak - (peak - low) * (i - start - up - plateau + 1) / down)
        else:
            rates.append(low)
    return rates


async def run_policy(run: Run, rates: list[float], args) -> None:
    import httpx

    sync = args.sync_s
    for _ in range(run.hpa.min_replicas):
        run.add(0.0)
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=400)) as client:
        while not all(p.is_ready for p in run.pods):
            await run.observe(client)
            await asyncio.sleep(0.2)
        await run.observe(client)  # the counters each step's increase starts from
        sent, tasks = 0, []
        for step, rate in enumerate(rates):
            begin, n = time.monotonic(), max(1, round(rate * args.step_s))
            for k in range(n):  # open loop: on schedule, whatever the answers
                await asyncio.sleep(max(0.0, begin + k * args.step_s / n - time.monotonic()))
                tasks.append(asyncio.ensure_future(run.send(client, sent)))
                sent += 1
            await asyncio.sleep(max(0.0, begin + args.step_s - time.monotonic()))
            values, missing, wait_sum, wait_count, wait_p95 = await run.observe(client)
            now, current = (step + 1) * sync, len(run.pods)
            desired = run.hpa.scale(now, current, Hpa.proposal(current, values, missing, run.target))
            metric = sum(values) / len(values) if values else 0.0
            ready = sum(p.is_ready for p in run.pods)
            run.steps.append(Step(rate, ready, current - ready, metric, wait_sum / max(wait_count, 1), wait_p95,
                                  run.failed))  # fmt: skip
            for _ in range(desired - current):
                run.add(now)
            for _ in range(current - desired):
                run.remove()
        await asyncio.gather(*tasks)
    for proc in [p.proc for p in run.pods] + run.removed:
        run.fleet.stop_one(proc)


def summary(run: Run, rates: list[float], sync: float) -> dict:
    ramp_start = next((i for i, r in enumerate(rates) if r > rates[0]), 0)
    most = max(s.ready for s in run.steps)
    reached = next(i for i, s in enumerate(run.steps) if s.ready == most)
    scaled = most > run.steps[0].ready
    return {
        "scale_up_s": (reached + 1 - ramp_start) * sync if scaled else None,
        "max_replicas": most,
        "max_p95_wait_s": max(s.wait_p95 for s in run.steps),
        "max_mean_wait_s": max(s.wait_mean for s in run.steps),
        "replica_s": sum((s.ready + s.starting) * sync for s in run.steps),
        "failed": run.failed,
    }


def chart() -> tuple[dict, Rules, Rules, float]:
    """The chart's server autoscaling values, its scale-up and scale-down rules, its CPU request (cores)."""
    import yaml

    if not VALUES.exists():
        raise SystemExit(f"{VALUES} is missing: the bench reads the chart's autoscaling values from it")
    values = yaml.safe_load(VALUES.read_text())
    server, behavior = values["autoscaling"]["server"], values["autoscaling"]["server"].get("behavior", {})
    request = str(values["server"]["resources"]["requests"]["cpu"])
    cores = float(request[:-1]) / 1000 if request.endswith("m") else float(request)
    return (
        server,
        Rules.of(behavior.get("scaleUp"), DEFAULT_UP),
        Rules.of(behavior.get("scaleDown"), DEFAULT_DOWN),
        cores,
    )


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="HPA syncs per policy")
    parser.add_argument("--step-s", type=float, default=2.0, help="real seconds per step")
    parser.add_argument("--sync-s", type=float, default=30.0, help="simulated seconds per step (one HPA sync)")
    parser.add_argument("--low", type=float, default=6.0, help="requests/s before and after the ramp")
    parser.add_argument("--peak", type=float, default=48.0, help="requests/s on the plateau")
    parser.add_argument("--delay-ms", type=float, default=200.0, help="fake model compute per batch (x 1 + 0.1 b)")
    parser.add_argument("--max-batch-size", type=int, default=4)
    parser.add_argument("--min-replicas", type=int, default=None, help="default: the chart's minReplicas")
    parser.add_argument("--cpu-request", type=float, default=None, help="cores; default: the chart's request")
    parser.add_argument("--cpu-target", type=float, default=70.0, help="CPU policy: target utilisation, percent")
    parser.add_argument("--policies", default="queue,cpu", help="which to run: queue, cpu or both")
    args = parser.parse_args()

    values, up, down, cores = chart()
    args.cpu_request = args.cpu_request or cores
    low = args.min_replicas or int(values["minReplicas"])
    high = min(int(values["maxReplicas"]), MAX_PROCESSES)
    capacity = args.max_batch_size / (args.delay_ms / 1000 * (1 + 0.1 * args.max_batch_size))
    rates = ramp(args)
    print(f"autoscale: {cpu_name()}, {os.cpu_count()} CPUs; {args.steps} steps of {args.step_s:g} s real = "
          f"{args.sync_s:g} s simulated; replicas {low}..{high} (chart max {values['maxReplicas']}, at most "
          f"{MAX_PROCESSES} processes); one replica serves ~{capacity:.1f} inputs/s (batch {args.max_batch_size}, "
          f"{args.delay_ms:g} ms x (1 + 0.1 b)); load {args.low:g} -> {args.peak:g} req/s")  # fmt: skip
    print(f"  queue policy: moorage_queue_depth per pod, target {values['targetQueueDepth']}; CPU policy: "
          f"{args.cpu_target:g} % of {args.cpu_request:g} cores; tolerance {TOLERANCE}; scale-up window "
          f"{up.window_s:g} s {up.select} {up.policies}; scale-down window {down.window_s:g} s {down.select} "
          f"{down.policies}")  # fmt: skip

    with tempfile.TemporaryDirectory(prefix="moorage-autoscale-") as tmp:
        home = Path(tmp) / "home"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MOORAGE_")} | {
            "MOORAGE_HOME": str(home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "MOORAGE_SECURITY__AUTH": "false", "MOORAGE_SERVE__MAX_BATCH_SIZE": str(args.max_batch_size),
            "MOORAGE_SERVE__MAX_WAIT_MS": "2", "MOORAGE_SERVE__POLL_INTERVAL_S": "0",
        }  # fmt: skip
        registry = Registry(f"sqlite:///{home / 'catalog.db'}", str(home / "artifacts"), user="bench")
        registry.register(make_fake_model(Path(tmp) / "emb", "embed", delay_ms=args.delay_ms), "emb", "embed")
        registry.close()
        fleet = Fleet(env, Path(tmp))
        runs = []
        try:
            for name in args.policies.split(","):
                target = float(values["targetQueueDepth"]) if name == "queue" else args.cpu_target
                run = Run(name, args, fleet, Hpa(low, high, up, down), target)
                with OtherLoad(children=True) as other:
                    asyncio.run(run_policy(run, rates, args))
                run.other_share = other.share
                runs.append(run)
        finally:
            fleet.stop()
    report(runs, rates, args)


def report(runs: list[Run], rates: list[float], args) -> None:
    cell = "{:>12} {:>9} {:>13}"
    print(f"\n{'':>13}" + "".join(f"  {r.name + ' policy':^36}" for r in runs))
    head = "  " + cell.format("ready+start", "metric", "wait mean/p95")
    print(f"{'t sim':>6} {'req/s':>6}" + head * len(runs))
    for i, rate in enumerate(rates):
        line = f"{(i + 1) * args.sync_s:>6.0f} {rate:>6.1f}"
        for r in runs:
            s = r.steps[i]
            metric = f"{s.metric:.0f} %" if r.name == "cpu" else f"{s.metric:.1f}"
            line += "  " + cell.format(f"{s.ready}+{s.starting}", metric, f"{s.wait_mean:.2f} / {s.wait_p95:.2f}")
        print(line)
    print()
    for r in runs:
        total = summary(r, rates, args.sync_s)
        up = "never" if total["scale_up_s"] is None else f"{total['scale_up_s']:.0f} s"
        other = "n/a" if r.other_share is None else f"{r.other_share:.0%}"
        print(f"{r.name:>5}: most replicas {total['max_replicas']}, reached {up} after the ramp began; worst "
              f"step's queue wait mean {total['max_mean_wait_s']:.2f} s, p95 {total['max_p95_wait_s']:.2f} s; "
              f"{total['replica_s']:.0f} replica-seconds; {total['failed']} failed requests; others took {other} "
              "of the machine")  # fmt: skip
        if r.start_s:
            mean = sum(r.start_s) / len(r.start_s)
            print(f"{'':>7}{len(r.start_s)} replicas added, each ready {mean:.1f} s (real) after its start = "
                  f"{mean * args.sync_s / args.step_s:.0f} s simulated")  # fmt: skip


if __name__ == "__main__":
    main()

"""`moorage` processes of one test or benchmark: servers and stream workers started in subprocesses,
each with its log file, all stopped by their pid at the end (SIGTERM, then SIGKILL after 30 s); and
the few calls such a test makes to them (readiness, a predict, a broker topic's messages)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import httpx

from moorage.streams import open_broker


class Fleet:
    """The processes of the test, each stopped by its pid at the end."""

    def __init__(self, env: dict, folder: Path) -> None:
        self.env, self.folder = env, folder
        self.procs: list[tuple[subprocess.Popen, Path]] = []

    def start(self, name: str, *args: str, env: dict | None = None) -> subprocess.Popen:
        """`python -m moorage ARGS` with the fleet's environment (updated by `env`), logging to NAME.log."""
        log = self.folder / f"{name}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "moorage", *args], env=self.env | (env or {}),
                                    stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        self.procs.append((proc, log))
        return proc

    def exited(self) -> list[str]:
        """The log names of the processes that have exited."""
        return [log.name for proc, log in self.procs if proc.poll() is not None]

    def logs(self) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for _, log in self.procs)

    def stop_one(self, proc: subprocess.Popen, timeout_s: float = 30) -> None:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def stop(self) -> None:
        for proc, _ in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc, _ in self.procs:
            self.stop_one(proc)


def ready(url: str) -> bool:
    """Whether the server at `url` answers /readyz with 200."""
    try:
        return httpx.get(url + "/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def predict(client: httpx.Client, url: str, key: str, text: str, model: str = "emb") -> httpx.Response:
    """One text to `model`'s predict route with the API key `key`."""
    return client.post(
        f"{url}/v1/models/{model}/predict", json={"inputs": [text]}, headers={"Authorization": f"Bearer {key}"}
    )


def publish(url: str, bodies: list[dict]) -> None:
    """Put `bodies` (as JSON) on the broker topic at `url`."""

    async def main() -> None:
        async with open_broker(url) as broker:
            await broker.publish([json.dumps(b).encode() for b in bodies])

    asyncio.run(main())


def dead_letter_reasons(url: str) -> list[str]:
    """The reason code of each dead letter of the topic at `url`."""

    async def main() -> list[str]:
        async with open_broker(url) as broker:
            return [d.reason.split(":")[0] for d in await broker.dead_letters()]

    return asyncio.run(main())


def metric(url: str, name: str, headers: dict | None = None, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`, from `url`/metrics (0 if none)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", headers=headers, timeout=5).raise_for_status().text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )

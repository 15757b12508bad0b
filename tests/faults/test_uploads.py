"""Hostile and broken uploads: every path into the registry (HTTP upload, `models register`,
`models import`) refuses malformed safetensors and unsafe archive members with a 4xx and a stable code
(or one line from the CLI) and keeps nothing; a promoted version that cannot be loaded answers the
reload with 422 model_load_failed, the watcher backs off exponentially, and other models still swap.

Real registry on SQLite in a tmp home, the real HTTP app in-process (httpx + asgi-lifespan)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import tarfile
from asyncio import run
from pathlib import Path

import numpy as np
import pytest

from moorage.registry import Manifest, Registry, export_model

# ---- malformed safetensors ---------------------------------------------------------------------


def _safetensors(header: dict | bytes, data: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _f32(n: int, begin: int) -> dict:
    return {"dtype": "F32", "shape": [n], "data_offsets": [begin, begin + 4 * n]}


MALFORMED = {
    "header_length_2_60": struct.pack("<Q", 2**60) + b'{"a": {}}' + b"\x00" * 64,
    "header_not_json": _safetensors(b"{this is not json}", b"\x00" * 16),
    "offsets_past_the_end": _safetensors({"embedding": _f32(1024, 0)}, b"\x00" * 64),
    "overlapping_offsets": _safetensors({"embedding": _f32(8, 0), "head": _f32(8, 16)}, b"\x00" * 48),
}


def _broken_model(fake_model, weights: bytes) -> Path:
    folder = fake_model("embed", seed=7)
    (folder / "weights.safetensors").write_bytes(weights)
    return folder


def _nothing_stored(registry: Registry, name: str) -> None:
    assert name not in [m.name for m in registry.list_models()]
    assert not (Path(registry.store.root) / name).exists(), "files were left in the store"


# ---- HTTP upload -------------------------------------------------------------------------------


def _tar(members: list[tuple[str, bytes, dict]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data, attrs in members:
            info = tarfile.TarInfo(name)  # addfile keeps the name as given (add() would strip a leading '/')
            info.size, info.mode = len(data), 0o644
            for key, value in attrs.items():
                setattr(info, key, value)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _members(folder: Path) -> list[tuple[str, bytes, dict]]:
    return [(p.name, p.read_bytes(), {}) for p in sorted(folder.iterdir())]


def _renamed(members, old: str, new: str):
    return [(new if name == old else name, data, attrs) for name, data, attrs in members]


def _with_mode(members, target: str, mode: int):
    return [(name, data, {**attrs, "mode": mode} if name == target else attrs) for name, data, attrs in members]


SPARSE = {"pax_headers": {"GNU.sparse.map": "0,5", "GNU.sparse.size": str(1 << 20)}}  # 5 bytes that unpack to 1 MiB
ARCHIVES = {
    "absolute_path": (lambda m: _renamed(m, "weights.safetensors", "/weights.safetensors"), "absolute path"),
    "dotdot_path": (lambda m: _renamed(m, "weights.safetensors", "sub/../weights.safetensors"), "'..'"),
    "setuid_file": (lambda m: _with_mode(m, "fake.json", 0o4755), "setuid"),
    "setgid_file": (lambda m: _with_mode(m, "fake.json", 0o2755), "setgid"),
    "sparse_member": (lambda m: [*m, ("notes.txt", b"hello", SPARSE)], "sparse"),
}


@pytest.fixture
def served(registry, fake_model):
    registry.register(fake_model("embed"), "emb", "embed", alias="production")
    return registry


def _upload(settings, registry, serving, body: bytes):
    async def main():
        async with serving(settings, registry, ["emb@production"], poll_interval_s=0) as (_, c):
            return await c.post("/v1/registry/models/up/versions", params={"task": "embed"}, content=body)

    return run(main())


def _assert_refused(response, code: str, words: str) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    assert words in error["message"] and "\n" not in error["message"] and "Traceback" not in error["message"]


def test_a_clean_upload_is_registered(settings, served, fake_model, serving):
    """The control: the same harness registers a good archive (so the refusals below are the checks)."""
    response = _upload(settings, served, serving, _tar(_members(fake_model("embed", seed=3))))
    assert response.status_code == 201, response.text
    assert served.verify("up:1") == []


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_upload_of_malformed_safetensors_is_refused_and_keeps_nothing(settings, served, fake_model, serving, case):
    body = _tar(_members(_broken_model(fake_model, MALFORMED[case])))
    response = _upload(settings, served, serving, body)
    _assert_refused(response, "invalid_artifact", "weights.safetensors: not a valid safetensors file")
    _nothing_stored(served, "up")


@pytest.mark.parametrize("case", sorted(ARCHIVES))
def test_upload_of_an_unsafe_member_is_refused_and_keeps_nothing(settings, served, fake_model, serving, case):
    rewrite, words = ARCHIVES[case]
    body = _tar(rewrite(_members(fake_model("embed", seed=3))))
    response = _upload(settings, served, serving, body)
    _assert_refused(response, "unsafe_archive", words)
    _nothing_stored(served, "up")


# ---- CLI: register, verify, import -------------------------------------------------------------


def _cli(monkeypatch, capsys, home: Path, *args: str) -> tuple[int, str, str]:
    from moorage.cli.main import main

    monkeypatch.setattr("sys.argv", ["moorage", "--home", str(home), *args])
    monkeypatch.setattr("faulthandler.enable", lambda: None)  # captured stderr has no file descriptor
    with pytest.raises(SystemExit) as info:
        main()
    out = capsys.readouterr()
    return info.value.code, out.out, out.err


def _assert_one_line_error(code: int, err: str, words: str) -> None:
    assert code == 2, err
    last = err.splitlines()[-1]  # any line before it is the progress bar of the copy that was undone
    assert last.startswith("error: ") and words in last, err
    assert "Traceback" not in err and "unexpected" not in err, err


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_register_of_malformed_safetensors_is_one_line_and_keeps_nothing(
    monkeypatch, capsys, registry, home, fake_model, case
):
    folder = _broken_model(fake_model, MALFORMED[case])
    code, _, err = _cli(monkeypatch, capsys, home, "models", "register", str(folder), "-n", "bad", "-t", "embed")
    _assert_one_line_error(code, err, "weights.safetensors: not a valid safetensors file")
    _nothing_stored(registry, "bad")


def test_register_of_a_setuid_file_or_a_fifo_is_refused(monkeypatch, capsys, registry, home, fake_model):
    folder = fake_model("embed", seed=4)
    os.chmod(folder / "fake.json", 0o4755)
    code, _, err = _cli(monkeypatch, capsys, home, "models", "register", str(folder), "-n", "bad", "-t", "embed")
    _assert_one_line_error(code, err, "fake.json: it is setuid or setgid")
    os.chmod(folder / "fake.json", 0o644)
    os.mkfifo(folder / "pipe")
    code, _, err = _cli(monkeypatch, capsys, home, "models", "register", str(folder), "-n", "bad", "-t", "embed")
    _assert_one_line_error(code, err, "pipe: it is not a regular file")
    _nothing_stored(registry, "bad")


def _register_unchecked(registry: Registry, monkeypatch, folder: Path, name: str, **kwargs):
    """A version registered before moorage checked headers (or by another tool writing the catalog)."""
    with monkeypatch.context() as m:
        m.setattr("moorage.registry.service.check_folder_files", lambda *args: None, raising=False)
        return registry.register(folder, name, "embed", **kwargs)


def test_verify_reports_a_malformed_header(monkeypatch, capsys, registry, home, fake_model):
    _register_unchecked(registry, monkeypatch, _broken_model(fake_model, MALFORMED["header_not_json"]), "old")
    assert registry.verify("old:1") == [
        "weights.safetensors: not a valid safetensors file (the header is not JSON: Expecting property name "
        "enclosed in double quotes: line 1 column 2 (char 1))"
    ]
    code, out, _ = _cli(monkeypatch, capsys, home, "models", "verify", "old:1")
    assert code == 1 and "FAILED" in out and "not a valid safetensors file" in out


def _rewrite_export(folder: Path, version: int, files: dict[str, bytes]) -> None:
    """Replace the files of one exported version, checksums and manifests made consistent again, as a
    careful attacker (or a buggy exporter) would."""
    doc = json.loads((folder / "export.json").read_text())
    entry = next(v for v in doc["versions"] if v["version"] == version)
    manifest = Manifest.model_validate(entry["manifest"])
    keep = [f for f in manifest.files if f.path not in files]
    added = [{"path": p, "sha256": hashlib.sha256(d).hexdigest(), "size": len(d)} for p, d in files.items()]
    manifest = manifest.model_copy(update={"files": [*keep, *[type(keep[0])(**a) for a in added]]})
    for path, data in files.items():
        target = folder / str(version) / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    data = manifest.to_bytes()
    (folder / str(version) / "moorage.json").write_bytes(data)
    entry["manifest"], entry["manifest_sha256"] = manifest.model_dump(mode="json"), hashlib.sha256(data).hexdigest()
    (folder / "export.json").write_text(json.dumps(doc))


@pytest.mark.parametrize(
    ("files", "words"),
    [
        ({"weights.safetensors": MALFORMED["offsets_past_the_end"]}, "not a valid safetensors file"),
        ({"../../../../escaped.safetensors": _safetensors({})}, "'..' component"),
    ],
    ids=["malformed_weights", "dotdot_path"],
)
def test_import_of_a_doctored_export_is_refused_and_keeps_nothing(
    monkeypatch, capsys, registry, home, tmp_path, fake_model, files, words
):
    source = Registry(f"sqlite:///{tmp_path}/source.db", str(tmp_path / "source-store"))
    source.register(fake_model("embed", seed=5), "x", "embed", alias="production")
    export = tmp_path / "a" / "b" / "export"
    export_model(source, "x", str(export))
    source.close()
    _rewrite_export(export / "x", 1, files)
    code, _, err = _cli(monkeypatch, capsys, home, "models", "import", str(export))
    _assert_one_line_error(code, err, words)
    _nothing_stored(registry, "x")
    assert not (tmp_path / "escaped.safetensors").exists(), "a file was written outside the store"


# ---- a promoted version that does not load -----------------------------------------------------


def _handler_raises(fake_model) -> Path:
    """Valid safetensors without the tensor the handler needs: its load raises KeyError."""
    from safetensors.numpy import save_file

    folder = fake_model("embed", seed=9)
    save_file({"other": np.zeros((4, 4), np.float32)}, str(folder / "weights.safetensors"))
    return folder


@pytest.mark.parametrize("broken", ["handler_raises", "unchecked_header"])
def test_a_version_that_fails_to_load_backs_off_and_blocks_no_other_swap(
    settings, registry, fake_model, serving, monkeypatch, broken
):
    registry.register(fake_model("embed", seed=1), "emb", "embed", alias="production")
    registry.register(fake_model("classify", seed=1), "cls", "classify", alias="production")
    if broken == "handler_raises":
        registry.register(_handler_raises(fake_model), "emb", "embed")
    else:
        _register_unchecked(registry, monkeypatch, _broken_model(fake_model, MALFORMED["header_length_2_60"]), "emb")
    registry.register(fake_model("classify", seed=2), "cls", "classify")

    async def main():
        async with serving(settings, registry, ["emb@production", "cls@production"], poll_interval_s=0) as (app, c):
            registry.set_alias("emb", "production", 2, "a bad release")
            registry.set_alias("cls", "production", 2, "a good release")
            pool = app.state.pool
            now = [1000.0]
            pool.clock = lambda: now[0]
            loads: list[int] = []
            real_load = pool.runtime.load
            monkeypatch.setattr(
                pool.runtime,
                "load",
                lambda info, *a: (loads.append(info.version) if info.name == "emb" else None) or real_load(info, *a),
            )
            reload = await c.post("/admin/reload")
            served = {m["id"]: m["version"] for m in (await c.get("/v1/models")).json()["data"]}
            still = await c.post("/v1/models/emb@production/predict", json={"inputs": ["hi"]})

            # the watcher's ticks: a try only once the delay has passed, each delay twice the last, capped
            delays, attempts_seen = [], []
            for _ in range(10):
                failure = pool.load_failures()["emb@production"]
                delays.append(failure.delay_s)
                assert await pool.reload(force=False) == []  # before the delay: nothing is tried
                attempts_seen.append(pool.load_failures()["emb@production"].attempts)
                now[0] = failure.next_attempt_at
                with pytest.raises(Exception) as info:
                    await pool.reload(force=False)
                assert info.value.code == "model_load_failed"

            registry.rollback("cls", "production", "meanwhile, cls moves back")  # while emb waits out its delay
            cls_moved = await pool.reload(force=False)
            registry.rollback("emb", "production", "give up on emb:2")
            emb_back = await pool.reload(force=False)
            return reload, served, still, delays, attempts_seen, loads, cls_moved, emb_back, pool.load_failures()

    reload, served, still, delays, attempts_seen, loads, cls_moved, emb_back, failures = run(main())
    assert reload.status_code == 422, reload.text
    error = reload.json()["error"]
    assert error["code"] == "model_load_failed" and "emb:2" in error["message"]
    assert "cls@production swapped 1 -> 2" in error["message"]
    assert served == {"emb@production": 1, "cls@production": 2}  # cls swapped although emb failed
    assert still.status_code == 200 and still.json()["version"] == 1  # emb keeps serving its old version
    assert delays == [2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 300.0, 300.0]
    assert attempts_seen == list(range(1, 11))  # a tick inside the delay tries nothing
    assert loads == [2] * 11  # the HTTP reload and one per elapsed delay, never every tick
    assert cls_moved == [{"model": "cls@production", "from_version": 2, "to_version": 1}]
    assert emb_back == [] and failures == {}


def test_the_watcher_waits_out_the_delay_between_tries(settings, registry, fake_model, serving, monkeypatch):
    """The real watcher, ticking every 10 ms on a frozen clock: one try, then none until the delay is over."""
    from tests.support import eventually

    registry.register(fake_model("embed", seed=1), "emb", "embed", alias="production")
    registry.register(_handler_raises(fake_model), "emb", "embed")

    async def main():
        async with serving(settings, registry, ["emb@production"], poll_interval_s=0.01) as (app, _):
            pool = app.state.pool
            now = [1000.0]
            pool.clock = lambda: now[0]
            ticks: list[int] = []
            loads: list[int] = []
            real_resolve, real_load = pool.registry.resolve, pool.runtime.load
            monkeypatch.setattr(pool.registry, "resolve", lambda ref: ticks.append(1) or real_resolve(ref))
            monkeypatch.setattr(
                pool.runtime, "load", lambda info, *a: loads.append(info.version) or real_load(info, *a)
            )
            registry.set_alias("emb", "production", 2, "a bad release")
            await eventually(lambda: len(loads) == 1, what="the watcher's first try")
            seen = len(ticks)
            await eventually(lambda: len(ticks) >= seen + 20, what="20 more ticks")
            tries_while_waiting = len(loads)
            first = pool.load_failures()["emb@production"]
            now[0] = first.next_attempt_at
            await eventually(lambda: len(loads) == 2, what="the try after the delay")
            await eventually(lambda: pool.load_failures()["emb@production"].attempts == 2, what="the second failure")
            return tries_while_waiting, first, pool.load_failures()["emb@production"], pool.served()

    tries_while_waiting, first, second, served = run(main())
    assert tries_while_waiting == 1  # 20 ticks inside the delay tried nothing
    assert (first.attempts, first.delay_s, first.version) == (1, 2.0, 2)
    assert (second.attempts, second.delay_s, second.next_attempt_at) == (2, 4.0, first.next_attempt_at + 4.0)
    assert served["emb@production"].version == 1

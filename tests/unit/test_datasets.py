"""Registered datasets: reading, refusals, deduplication, stratified splits, digests, storage, lineage."""

from __future__ import annotations

import csv
import hashlib
import json
import random
import shutil
from collections import Counter
from pathlib import Path

import fsspec
import pytest

from moorage.config import load_settings
from moorage.errors import IntegrityError, ModelNotFound, MoorageError
from moorage.registry import Registry
from moorage.training.datasets import STORE_PREFIX, DatasetNotFound, Datasets, SplitSpec
from moorage.training.rows import normalize

CLASSES = {"sport": 30, "tech": 20, "politics": 10}  # imbalanced on purpose: stratification shows


def _rows(classes: dict[str, int] = CLASSES) -> list[dict]:
    return [{"text": f"{label} story number {i}", "label": label} for label, n in classes.items() for i in range(n)]


def _jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _stored_files(datasets: Datasets) -> list[str]:
    root = datasets.root
    return datasets.store.fs.find(root) if datasets.store.fs.exists(root) else []


@pytest.fixture(scope="module")
def migrated(tmp_path_factory) -> Path:
    """A catalog at the newest schema, copied into each test's home: migrating one from scratch takes
    half a second, a copy a millisecond."""
    home = tmp_path_factory.mktemp("migrated")
    Datasets.from_settings(load_settings(environ={"MOORAGE_HOME": str(home)})).catalog.dispose()
    return home / "catalog.db"


@pytest.fixture
def datasets(settings, migrated):
    settings.home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(migrated, settings.home / "catalog.db")
    ds = Datasets.from_settings(settings)
    yield ds
    ds.catalog.dispose()


@pytest.fixture(scope="module")
def bbc(tmp_path_factory):
    """BBC News registered once for the module (its add reads and splits 2,225 articles)."""
    from moorage.demo.assets import bbc_news

    home = tmp_path_factory.mktemp("bbc")
    ds = Datasets.from_settings(load_settings(environ={"MOORAGE_HOME": str(home)}))
    version = ds.add("bbc-news", _jsonl(home / "bbc-news.jsonl", bbc_news()))
    yield ds, version
    ds.catalog.dispose()


def test_bbc_news_loses_its_101_duplicates_and_no_text_is_in_two_splits(bbc):
    ds, version = bbc
    assert version.stats["rows_read"] == 2225
    assert version.stats["exact_duplicates"] + version.stats["normalized_duplicates"] == 101
    assert version.stats["rows"] == 2124 and version.stats["refused"] == 0
    assert version.label_map == {"business": 0, "entertainment": 1, "politics": 2, "sports": 3, "tech": 4}
    splits = {name: ds.examples(version, name) for name in ("train", "validation", "test")}
    assert sum(len(rows) for rows in splits.values()) == 2124
    for name, rows in splits.items():
        assert version.splits[name].rows == len(rows)
    exact = {name: {e.text for e in rows} for name, rows in splits.items()}
    normalized = {name: {normalize(e.text) for e in rows} for name, rows in splits.items()}
    for a, b in (("train", "test"), ("train", "validation"), ("validation", "test")):
        assert not exact[a] & exact[b]
        assert not normalized[a] & normalized[b]


def test_bbc_test_split_is_stratified(bbc):
    ds, version = bbc
    everything = Counter(e.label for name in version.splits for e in ds.examples(version, name))
    test = Counter(e.label for e in ds.examples(version, "test"))
    for label, count in everything.items():
        assert abs(test[label] - count * 0.2) <= 1, (label, test[label], count)


def test_splits_are_deterministic_by_seed_and_free_of_row_order(datasets, tmp_path):
    rows = _rows()
    first = datasets.add("a", _jsonl(tmp_path / "a.jsonl", rows))
    shuffled = rows[::-1]
    random.Random(1).shuffle(shuffled)
    again = datasets.add("b", _jsonl(tmp_path / "b.jsonl", shuffled))
    other_seed = datasets.add("c", _jsonl(tmp_path / "c.jsonl", rows), split=SplitSpec(seed=1))
    assert again.digest == first.digest == other_seed.digest
    assert {n: s.digest for n, s in again.splits.items()} == {n: s.digest for n, s in first.splits.items()}
    assert other_seed.splits["test"].digest != first.splits["test"].digest
    assert {n: s.rows for n, s in first.splits.items()} == {"train": 42, "validation": 6, "test": 12}
    test = Counter(e.label for e in datasets.examples(first, "test"))
    assert test == {"sport": 6, "tech": 4, "politics": 2}  # 20 % of each class


def test_each_split_digest_is_the_sha256_of_its_stored_rows(datasets, tmp_path):
    version = datasets.add("a", _jsonl(tmp_path / "a.jsonl", _rows()))
    for name, info in version.splits.items():
        with datasets.store.fs.open(f"{datasets.root}/a/1/{name}.jsonl", "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == info.digest
    assert version.lineage() == {
        "name": "a",
        "version": 1,
        "digest": version.digest,
        "seed": 0,
        "splits": {name: info.digest for name, info in version.splits.items()},
    }


def test_altered_split_file_is_refused_on_read(datasets, tmp_path):
    version = datasets.add("a", _jsonl(tmp_path / "a.jsonl", _rows()))
    path = f"{datasets.root}/a/1/test.jsonl"
    with datasets.store.fs.open(path, "ab") as f:
        f.write(b'{"label":"sport","text":"planted"}\n')
    with pytest.raises(IntegrityError):
        datasets.examples(version, "test")


def test_k_folds_cover_every_row_once_stratified(datasets, tmp_path):
    version = datasets.add("a", _jsonl(tmp_path / "a.jsonl", _rows()), split=SplitSpec(folds=5))
    assert list(version.splits) == [f"fold-{i}" for i in range(5)]
    folds = [datasets.examples(version, name) for name in version.splits]
    texts = [e.text for fold in folds for e in fold]
    assert len(texts) == len(set(texts)) == 60
    for fold in folds:
        assert Counter(e.label for e in fold) == {"sport": 6, "tech": 4, "politics": 2}


def test_jsonl_csv_parquet_and_a_memory_url_hold_the_same_dataset(datasets, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _rows()
    with open(tmp_path / "a.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["label", "text"])
        writer.writeheader()
        writer.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    with fsspec.open("memory://datasets-test/a.jsonl", "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    found = [
        datasets.add("from-jsonl", _jsonl(tmp_path / "a.jsonl", rows)),
        datasets.add("from-csv", str(tmp_path / "a.csv")),
        datasets.add("from-parquet", str(tmp_path / "a.parquet")),
        datasets.add("from-memory", "memory://datasets-test/a.jsonl"),
    ]
    assert len({v.digest for v in found}) == 1
    assert len({v.splits["test"].digest for v in found}) == 1
    assert found[3].source == "memory://datasets-test/a.jsonl"


def test_field_mapping_and_integer_labels(datasets, tmp_path):
    rows = [{"body": f"row {i}", "topic": i % 2} for i in range(20)]
    version = datasets.add("a", _jsonl(tmp_path / "a.jsonl", rows), text="body", label="topic")
    assert version.kind == "classify" and version.label_map == {"0": 0, "1": 1}


def test_duplicates_exact_normalized_and_with_conflicting_labels(datasets, tmp_path):
    rows = _rows() + [
        {"text": "sport story number 1", "label": "sport"},  # exact copy
        {"text": "  SPORT   story number 2 ", "label": "sport"},  # the same once normalised
        {"text": "ｓｐｏｒｔ story number 3", "label": "sport"},  # full-width letters: NFKC folds them
        {"text": "tech story number 1", "label": "politics"},  # the same text, another label
    ]
    version = datasets.add("a", _jsonl(tmp_path / "a.jsonl", rows))
    stats = version.stats
    assert (stats["exact_duplicates"], stats["normalized_duplicates"], stats["label_conflicts"]) == (1, 2, 2)
    assert stats["rows"] == 59  # both copies of the disputed text are gone
    texts = {e.text for name in version.splits for e in datasets.examples(version, name)}
    assert "tech story number 1" not in texts and "sport story number 1" in texts


def test_chat_and_text_only_datasets(datasets, tmp_path):
    chats = [
        {"conversation": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"hello {i}"}]}
        for i in range(20)
    ]
    chat = datasets.add("chat", _jsonl(tmp_path / "chat.jsonl", chats), messages="conversation")
    assert chat.kind == "chat" and chat.label_map == {}
    example = datasets.examples(chat, "train")[0]
    assert example.messages is not None and example.messages[0]["role"] == "user"
    assert example.text == "\n".join(f"{m['role']}: {m['content']}" for m in example.messages)
    plain = datasets.add(
        "plain", _jsonl(tmp_path / "plain.jsonl", [{"text": f"line {i}"} for i in range(20)]), label=None
    )
    assert plain.kind == "text" and sum(s.rows for s in plain.splits.values()) == 20


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[str, dict]]:
    wrong = _rows() + [{"text": 42, "label": "sport"}, {"text": "x", "label": {"a": 1}}, ["not", "an", "object"]]
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    return {
        "dataset_empty": (_jsonl(tmp_path / "empty.jsonl", []), {}),
        "single_class": (_jsonl(tmp_path / "one.jsonl", _rows({"sport": 10})), {}),
        "label_missing": (_jsonl(tmp_path / "nolabel.jsonl", [{"text": "a", "category": "x"}]), {}),
        "text_missing": (_jsonl(tmp_path / "notext.jsonl", [{"body": "a", "label": "x"}]), {}),
        "invalid_rows": (_jsonl(tmp_path / "wrong.jsonl", wrong), {}),
        "dataset_unreadable": (str(tmp_path / "nowhere.jsonl"), {}),
        "messages_missing": (_jsonl(tmp_path / "nochat.jsonl", _rows()), {"messages": "conversation"}),
    }


@pytest.mark.parametrize(
    "code",
    [
        "dataset_empty",
        "single_class",
        "label_missing",
        "text_missing",
        "invalid_rows",
        "dataset_unreadable",
        "messages_missing",
    ],
)
def test_bad_input_is_a_one_line_error_and_stores_nothing(datasets, tmp_path, code):
    path, kwargs = _bad_inputs(tmp_path)[code]
    with pytest.raises(MoorageError) as caught:
        datasets.add("bad", path, **kwargs)
    assert caught.value.code == code and caught.value.status == 400
    assert "\n" not in caught.value.message
    assert datasets.list() == [] and _stored_files(datasets) == []
    with pytest.raises(DatasetNotFound):
        datasets.get("bad")


def test_rows_of_the_wrong_type_are_counted_with_examples(datasets, tmp_path):
    path, _ = _bad_inputs(tmp_path)["invalid_rows"]
    with pytest.raises(MoorageError) as caught:
        datasets.add("bad", path)
    message = caught.value.message
    assert "3 of 63 rows refused" in message and "3 of the wrong type" in message
    assert "row 61: 'text' is an int" in message and "row 63" in message
    kept = datasets.add("bad", path, skip_invalid=True)
    assert (kept.stats["refused"], kept.stats["wrong_type"], kept.stats["rows"]) == (3, 3, 60)


def test_unreadable_files_say_why(datasets, tmp_path):
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    (tmp_path / "data.xlsx").write_bytes(b"")
    (tmp_path / "latin1.csv").write_bytes("text,label\ncaf\xe9,a\n".encode("latin-1"))
    for name, says in (
        ("broken.parquet", "cannot read"),
        ("data.xlsx", "unknown format .xlsx"),
        ("latin1.csv", "UTF-8"),
    ):
        with pytest.raises(MoorageError) as caught:
            datasets.add("bad", str(tmp_path / name))
        assert caught.value.code == "dataset_unreadable" and says in caught.value.message
    assert _stored_files(datasets) == []


def test_the_same_rows_are_not_stored_twice_and_new_rows_make_a_version(datasets, tmp_path):
    path = _jsonl(tmp_path / "a.jsonl", _rows())
    first, created = datasets.ensure("a", path)
    again, created_again = datasets.ensure("a", path)
    assert (created, created_again) == (True, False) and again == first
    second = datasets.add("a", _jsonl(tmp_path / "b.jsonl", _rows({"sport": 31, "tech": 20, "politics": 10})))
    assert second.version == 2 and datasets.get("a") == second and datasets.get("a:1") == first
    assert [v.ref for v in datasets.list()] == ["a:2"]
    with pytest.raises(DatasetNotFound):
        datasets.get("a:3")


def test_a_failed_write_leaves_no_row_and_no_file(datasets, tmp_path, monkeypatch):
    fs = datasets.store.fs
    real_open = fs.open

    def fail_on_test_split(path, mode="rb", **kwargs):
        if "w" in mode and str(path).endswith("/test.jsonl"):
            raise OSError(28, "No space left on device")
        return real_open(path, mode, **kwargs)

    monkeypatch.setattr(fs, "open", fail_on_test_split)
    with pytest.raises(OSError):
        datasets.add("a", _jsonl(tmp_path / "a.jsonl", _rows()))
    monkeypatch.undo()
    assert datasets.list() == [] and _stored_files(datasets) == []
    assert datasets.add("a", _jsonl(tmp_path / "a.jsonl", _rows())).version == 1


def test_uses_answer_which_models_came_from_a_dataset(datasets, settings, fake_model, tmp_path):
    version = datasets.add("a", _jsonl(tmp_path / "a.jsonl", _rows()))
    registry = Registry.from_settings(settings)
    model = registry.register(fake_model("classify"), "topics", "classify")
    datasets.record_use(version, model.name, model.version)
    datasets.record_use(version, model.name, model.version)  # idempotent
    datasets.record_use(version, model.name, model.version, role="evaluated")
    assert datasets.uses("a") == [("topics", 1, "evaluated"), ("topics", 1, "trained")]
    assert datasets.uses("a", 1) == datasets.uses("a")
    with pytest.raises(ModelNotFound):
        datasets.record_use(version, "topics", 9)
    with pytest.raises(DatasetNotFound):
        datasets.uses("nope")
    registry.delete_version("topics", 1)
    assert datasets.uses("a") == []


def test_datasets_live_apart_from_models(datasets, tmp_path):
    datasets.add("a", _jsonl(tmp_path / "a.jsonl", _rows()))
    assert all(Path(p).relative_to(datasets.store.root).parts[0] == STORE_PREFIX for p in _stored_files(datasets))


def test_a_split_the_rows_cannot_fill_is_refused(datasets, tmp_path):
    path = _jsonl(tmp_path / "small.jsonl", _rows({"sport": 3, "tech": 3}))
    with pytest.raises(MoorageError) as caught:
        datasets.add("small", path, split=SplitSpec(folds=5))
    assert caught.value.code == "split_impossible" and "smallest has 3" in caught.value.message
    assert datasets.list() == [] and _stored_files(datasets) == []


def test_a_json_array_and_compressed_json_lines(datasets, tmp_path):
    import gzip

    rows = _rows()
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    array, compressed = (
        datasets.add("array", str(tmp_path / "a.json")),
        datasets.add("gz", str(tmp_path / "a.jsonl.gz")),
    )
    assert array.digest == compressed.digest and array.stats["rows"] == 60


def test_the_command_line_lists_shows_versions_and_uses(settings, migrated, tmp_path):
    from typer.testing import CliRunner

    from moorage.cli.main import app

    settings.home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(migrated, settings.home / "catalog.db")
    path = _jsonl(tmp_path / "a.jsonl", _rows())

    def run(*args: str):
        result = CliRunner().invoke(app, ["--home", str(settings.home), "datasets", *args], env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        return result.output

    assert "registered a:1 classify: 60 rows of 60 read" in run("add", "a", path)
    assert "a:1 already holds these rows" in run("add", "a", path)
    assert "a:2" in run("add", "a", path, "--folds", "3")
    assert "5 folds" not in run("list") and "3 folds" in run("list")
    assert [line.split()[1] for line in run("versions", "a").splitlines() if "classify" in line] == ["1", "2"]
    shown = json.loads(run("show", "a:1", "--json"))
    assert shown["stats"]["rows"] == 60 and set(shown["splits"]) == {"train", "validation", "test"}
    assert "no model was made from a:1 yet" in run("uses", "a:1")

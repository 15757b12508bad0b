"""Helpers tests share: waiting on a condition instead of sleeping for a fixed time; tiny models."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


async def eventually(
    condition: Callable[[], bool], timeout_s: float = 30.0, what: str = "condition", interval_s: float = 0.002
) -> None:
    """Yield to the event loop until `condition()` holds. The deadline is generous on purpose: it only
    turns a hang into a failure, and is never what a test synchronises on."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout_s}s")
        await asyncio.sleep(interval_s)


def wait_until(
    condition: Callable[[], bool], timeout_s: float = 30.0, what: str = "condition", interval_s: float = 0.002
) -> None:
    """The same, for a test that is not async. A condition that queries a SQLite catalog the process
    under test writes to should poll at a `interval_s` of 0.05 s or more: every catalog transaction
    takes the write lock, and one taken 500 times a second starves the server's own writes."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout_s}s")
        time.sleep(interval_s)


def run_cli(monkeypatch, capsys, *args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run the moorage CLI in this process as a user would: (exit status, stdout, stderr)."""
    from moorage.cli.main import main

    monkeypatch.delenv("MOORAGE_CONFIG", raising=False)
    monkeypatch.setattr("faulthandler.enable", lambda: None)  # captured stderr has no file descriptor
    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr("sys.argv", ["moorage", *args])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@contextmanager
def serve_in_thread(app, ready_s: float = 60.0) -> Iterator[str]:
    """`app` under uvicorn on 127.0.0.1 (a free port) in a thread; yields its base URL once `/readyz`
    answers 200 (its models are loaded), and stops the server afterwards."""
    import threading

    import httpx
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: bool(server.started and server.servers), ready_s, "the server's start")
        url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
        wait_until(lambda: httpx.get(f"{url}/readyz").status_code == 200, ready_s, "the models' load")
        yield url
    finally:
        server.should_exit = True
        thread.join(30)


def serve_workers(pid: int) -> set[int]:
    """The live worker processes of a `moorage serve --workers N` parent: its children, minus
    multiprocessing's resource tracker, which serves nothing."""
    workers = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_text(errors="replace")
            except OSError:  # it ended meanwhile
                continue
            if "resource_tracker" not in cmdline:
                workers.add(int(child))
    return workers


def smollm2_tokenizer_folder() -> Path:
    """SmolLM2's real tokenizer (49,152-token byte-level BPE) as a tokenizer folder. It ships only
    inside the demo package's GGUF file, and reading it from there takes seconds: it is converted
    once into the temporary directory (keyed by the package's version) and reused by later runs."""
    from moorage.demo import assets

    version = assets.package_version(assets.SMOLLM2_PACKAGE)
    target = Path(tempfile.gettempdir()) / "moorage-tests" / f"smollm2-tokenizer-{version}"
    if (target / "tokenizer.json").is_file():
        return target
    import transformers

    gguf = assets.package_folder(assets.SMOLLM2_PACKAGE) / assets.SMOLLM2_GGUF
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)  # atomic: a concurrent run converted it too, or nobody sees half a folder
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def tiny_llama(folder: Path, tokenizer: str = "minilm", seed: int = 0) -> Path:
    """A tiny random Llama (one layer, 16 wide) saved with a real tokenizer, for the transformers
    handlers: "minilm" (MiniLM's 30k WordPiece vocabulary, from the demo package) or "smollm2"
    (SmolLM2's 49k byte-level BPE, what grammar work needs). Nothing is downloaded."""
    import torch
    import transformers

    from moorage.demo.assets import minilm_folder

    source = smollm2_tokenizer_folder() if tokenizer == "smollm2" else minilm_folder()
    tok = transformers.AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    tok.save_pretrained(folder)
    if tokenizer == "smollm2":
        ids = {"eos_token_id": tok.eos_token_id, "pad_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id}
    else:
        ids = {"eos_token_id": tok.sep_token_id, "pad_token_id": tok.pad_token_id, "bos_token_id": tok.cls_token_id}
    config = transformers.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=32,
        **ids,
    )
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return folder


def tiny_bert(folder: Path, seed: int = 0) -> Path:
    """A tiny random BERT encoder (one layer, 32 wide) saved with MiniLM's real WordPiece tokenizer,
    laid out as a sentence-transformers folder like the registry's MiniLM (mean pooling, normalised):
    an `embed` model, and a base that `AutoModelForSequenceClassification` puts a head on. Nothing is
    downloaded."""
    import json

    import torch
    import transformers

    from moorage.demo.assets import minilm_folder

    tok = transformers.AutoTokenizer.from_pretrained(str(minilm_folder()), local_files_only=True)
    tok.save_pretrained(folder)
    config = transformers.BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    transformers.BertModel(config).save_pretrained(folder, safe_serialization=True)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128, "do_lower_case": False}))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    pooling = {"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True}
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    (folder / "2_Normalize").mkdir(exist_ok=True)
    return folder


def tiny_onnx_folder(tmp: Path, task: str = "embed", seed: int = 0) -> tuple[Path, Path]:
    """A tiny random BERT (tiny_bert's weights) as a torch folder and the same weights exported to
    ONNX in the derived-folder layout the ONNX Runtime handlers load (model.onnx, onnx.json, config
    and tokenizer files): `(torch_folder, onnx_folder)` under `tmp`. "embed": a sentence-transformers
    folder and a graph with mean pooling and L2 normalisation inside (output `embeddings`);
    "classify": a 3-label sequence classifier (output `logits`). Exported with torch.onnx (opset 17)."""
    import json
    import warnings

    import torch
    import transformers

    base = tiny_bert(tmp / f"bert-{task}-{seed}", seed=seed)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(base), local_files_only=True)
    tokenizer.model_max_length = 128  # the tiny model's positions: the torch classifier truncates there too
    if task == "embed":
        parent = base
        model = _graph_module(transformers.BertModel.from_pretrained(str(base)), task)
        output = "embeddings"
    elif task == "classify":
        labels = ["business", "sport", "tech"]
        torch.manual_seed(seed)
        classifier = transformers.BertForSequenceClassification.from_pretrained(
            str(base), num_labels=3, id2label=dict(enumerate(labels)), label2id={x: i for i, x in enumerate(labels)}
        )
        parent = tmp / f"torch-classify-{seed}"
        classifier.save_pretrained(parent, safe_serialization=True)
        tokenizer.save_pretrained(parent)
        model, output = _graph_module(classifier, task), "logits"
    else:
        raise ValueError(f"no tiny ONNX model for task {task!r}")
    folder = tmp / f"onnx-{task}-{seed}"
    folder.mkdir(parents=True)
    inputs = ["input_ids", "attention_mask", "token_type_ids"]
    sample = tokenizer(["a first sentence", "and a second, longer one"], padding=True, return_tensors="pt")
    axes = {name: {0: "batch", 1: "seq"} for name in inputs}
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation and tracer notes
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            tuple(sample[name] for name in inputs),
            str(folder / "model.onnx"),
            input_names=inputs,
            output_names=[output],
            dynamic_axes={**axes, output: {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    transformers.AutoConfig.from_pretrained(str(parent)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    meta = {
        "task": task,
        "precision": "fp32",
        "inputs": inputs,
        "output": output,
        "max_length": tokenizer.model_max_length,
        "normalize": task == "embed",
        "quantization": None,
    }
    (folder / "onnx.json").write_text(json.dumps(meta, indent=2))
    return parent, folder


def _graph_module(model, task: str):
    """The module torch.onnx traces: the encoder with mean pooling and L2 normalisation (embed, what
    the sentence-transformers folder does) or the classifier's logits, on the three BERT inputs."""
    import torch

    class Graph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            if task == "classify":
                return out.logits
            mask = attention_mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
            pooled = (out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=-1)

    return Graph().eval()

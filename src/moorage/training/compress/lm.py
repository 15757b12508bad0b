"""``lm-int8``: int8 weight-only linear layers for a causal LM, through torch's own int8 kernel
(``torch._weight_int8pack_mm``, not the deprecated ``torch.ao``).

Every linear layer (attention, MLP and the LM head) keeps its weight as int8 with one symmetric
scale per output channel; activations stay bfloat16. The runtime's generation handler loads the
folder (`moorage.runtime.hf.restore_int8_linears`): a decode step (a few rows) runs the int8 kernel,
a prompt's prefill dequantises each weight to bf16 for one matmul (the kernel is slower there).

Measured on this machine kind (Intel Xeon, AVX-512 BF16 + AMX, 1 torch thread, a shared 2-core VM),
SmolLM2-135M-Instruct, one matmul of the model's shapes:

    shape (out x in), rows     fp32      bf16    int8 w + fp32 act   int8 w + bf16 act
    1536 x 576, 1 row          258 us    237 us       803 us               78 us
    576 x 1536, 1 row          292 us    201 us       935 us               82 us
    49152 x 576 (head), 1 row  19.6 ms   14.3 ms      43.1 ms              5.8 ms
    1536 x 576, 128 rows       2.7 ms    0.6 ms       129 ms               6.7 ms

so int8 weights pay only with bf16 activations and only for a few rows (decode): hence the split at
`INT8_KERNEL_ROWS` rows. The whole model through the runtime's generation handler (median of 36
decode steps after a 64-token prompt, interleaved, load average ~8 on the 2 cores):

    parent fp32      decode step 112.0 ms ( 8.9 tok/s)   prefill 64 tokens 248 ms   513 MB
    parent bf16      decode step 111.5 ms ( 9.0 tok/s)   prefill 64 tokens 204 ms   257 MB
    int8, rest fp32  decode step  60.5 ms (16.5 tok/s)   prefill 64 tokens 419 ms   237 MB
    int8, rest bf16  decode step  41.1 ms (24.3 tok/s)   prefill 64 tokens 353 ms   183 MB (file 237 MB)

Quality on 8 BBC News articles (192 tokens each) against the fp32 parent: perplexity 32.675 ->
32.835 (+0.5 %; bf16 alone 32.735), next-token top-1 agreement 94.8 % (bf16 alone 96.6 %), 52 % of the
positions of two greedy 32-token continuations equal (bf16 alone 62 %; a continuation differs from
its first differing token on). Decoding is 2.7x faster than the bf16 parent and prefill 1.7x slower: worth it for chat,
where decode steps dominate.
"""

from __future__ import annotations

import shutil
from typing import Any

from pydantic import BaseModel, ConfigDict

from ...errors import BadRequest, require
from ...runtime.hf import INT8_KERNEL_ROWS, INT8_KEY, int8_config
from .distill import parse_params
from .methods import BuildContext, BuildResult, check_task


class LmInt8Params(BaseModel):
    """What `lm-int8` takes (recorded with the derived version)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    include_lm_head: bool = True  # the head is the largest matmul of a small LM (49152 x 576 in SmolLM2)


class LmInt8:
    name = "lm-int8"
    tasks: tuple[str, ...] = ("generate",)

    def build(self, ctx: BuildContext) -> BuildResult:
        check_task(self, ctx.parent.task, ctx.parent.ref)
        params = parse_params(LmInt8Params, ctx.params, self.name)
        if int8_config(ctx.parent_dir) is not None:
            raise BadRequest(f"{ctx.parent.ref} has int8 layers already", code="unsupported_method")
        tf, torch = require("transformers", "training"), require("torch", "training")
        from safetensors.torch import save_file

        model = tf.AutoModelForCausalLM.from_pretrained(
            str(ctx.parent_dir), local_files_only=True, use_safetensors=True, dtype=torch.float32
        )
        names = [
            name
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and (params.include_lm_head or module is not _head(model))
        ]
        if not names:
            raise BadRequest(f"{ctx.parent.ref} has no linear layers to quantise", code="unsupported_method")
        ctx.report(0, len(names), "quantising")
        state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
        error = 0.0
        for done, name in enumerate(names, 1):
            weight = model.get_submodule(name).weight.detach().float()
            scale = (weight.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
            quantised = torch.round(weight / scale[:, None]).clamp(-127, 127)
            error = max(error, float((quantised * scale[:, None] - weight).norm() / weight.norm().clamp(min=1e-12)))
            state[f"{name}.weight"] = quantised.to(torch.int8).contiguous()
            state[f"{name}.weight_scale"] = scale.contiguous()
            ctx.report(done, len(names), "quantising")
        config = model.config
        head = _head(model)
        if head is not None and getattr(config, "tie_word_embeddings", False) and params.include_lm_head:
            config.tie_word_embeddings = False  # the head is int8 now, the input embeddings stay float
        recorded = {
            "scheme": "symmetric, per output channel",
            "kernel": "torch._weight_int8pack_mm",
            "activations": "bfloat16",
            "kernel_rows": INT8_KERNEL_ROWS,
            "modules": names,
        }
        setattr(config, INT8_KEY, recorded)
        out = ctx.out_dir
        out.mkdir(parents=True, exist_ok=True)
        ignore = shutil.ignore_patterns("moorage.json", ".*", "*.safetensors", "*.safetensors.index.json")
        shutil.copytree(ctx.parent_dir, out, dirs_exist_ok=True, ignore=ignore)
        config.save_pretrained(out)
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        parameters = {
            **params.model_dump(),
            **{k: v for k, v in recorded.items() if k != "modules"},
            "num_int8_layers": len(names),
            "max_relative_weight_error": round(error, 6),
            "native_bf16": _native_bf16(torch),
        }
        notes = [f"{len(names)} linear layers int8 (largest relative weight error {error:.4f})"]
        if not parameters["native_bf16"]:
            notes.append("this CPU has no native bf16 (AVX512-BF16/AMX): the int8 kernel's bf16 activations are slow")
        return BuildResult(precision="int8", parameters=parameters, notes=notes)


def _head(model: Any) -> Any:
    get = getattr(model, "get_output_embeddings", None)
    return get() if get is not None else None


def _native_bf16(torch: Any) -> bool:
    from ...runtime.hf import _native_bf16 as native

    return bool(native(torch, "cpu"))

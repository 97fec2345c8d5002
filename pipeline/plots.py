"""Pictures people would rather look at than read: the Soft-DTW alignment of teacher and student tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def alignment_picture(
    export_dir: str | Path, cache_uri: str, out_png: str | Path, row_index: int = 0, gamma: float = 0.1
) -> Path:
    """Heat-map of the Soft-DTW expected alignment between one sample's student and teacher response tokens.

    Cost = 1 - cos(h^S_i, t2s(h^T_k)) with the trained ``t2s`` projector (eq. 18); the alignment is
    ``dsdtw/dC`` (the expected alignment matrix), drawn over the cost, with both tokenizations on the axes.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.analysis import student_states
    from student_train.kernels import soft_dtw
    from teacher_cache.reader import open_cache

    export_dir = Path(export_dir)
    cache = open_cache(cache_uri)
    row = next(r for i, r in enumerate(cache.iter_rows([0])) if i == row_index)
    tok = AutoTokenizer.from_pretrained(export_dir)
    model = AutoModelForCausalLM.from_pretrained(export_dir).eval()
    from student_train.model import projectors_path

    proj = load_file(str(projectors_path(export_dir)))
    t, hs = student_states(model, tok, row)
    s_rows = slice(max(t.response_start - 1, 0), len(t.input_ids) - 1)
    t_rows = slice(max(row.response_start - 1, 0), len(row.input_ids) - 1)
    x = hs[s_rows]
    y = row.hidden[t_rows] @ proj["t2s.weight"].T + proj["t2s.bias"]
    cost = (1 - torch.nn.functional.normalize(x, dim=-1) @ torch.nn.functional.normalize(y, dim=-1).T).clamp(
        0, 2
    )
    c = cost[None].clone().requires_grad_(True)
    soft_dtw(c, gamma).sum().backward()
    align = c.grad[0].numpy()

    s_labels = [tok.decode([i]) for i in t.input_ids[s_rows.start + 1 : s_rows.stop + 1]]
    t_text = row.prompt + row.response
    t_labels = [t_text[a:b] or "<eos>" for a, b in row.offsets[t_rows.start + 1 : t_rows.stop + 1]]
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * len(t_labels) + 2), max(3, 0.35 * len(s_labels) + 1.5)))
    ax.imshow(cost.numpy(), cmap="Greys", aspect="auto", vmin=0, vmax=2)
    ax.imshow(np.ma.masked_less(align, 0.02), cmap="autumn_r", aspect="auto", alpha=0.85, vmin=0, vmax=1)
    ax.set_xticks(range(len(t_labels)), [repr(s)[1:-1] for s in t_labels], rotation=90, fontsize=7)
    ax.set_yticks(range(len(s_labels)), [repr(s)[1:-1] for s in s_labels], fontsize=7)
    ax.set_xlabel(f"teacher response tokens ({cache.manifest.teacher['name']})")
    ax.set_ylabel("student response tokens")
    ax.set_title(f"Soft-DTW expected alignment (gamma={gamma}) over 1 - cos cost", fontsize=9)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png

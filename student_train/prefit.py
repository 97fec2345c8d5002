"""Projector pre-fit: fit the CMA's ``query`` and ``t2s`` projectors on ``proj_ce`` alone, before training.

Not in the papers (DSKD and DWA-KD train the projectors jointly with the student from a random init). With
few training steps the projectors stay poor for most of the run, and the student-space KD target
``softmax(z_t2s)`` they produce is then noise (docs/BENCHMARKS.md, the diagnostics of the pretrained pair).
``proj_ce`` reads the student only through its embedding table and head, so the pre-fit needs no student
forward: each step costs one cross-model attention and one student-head projection of the response rows.
The student and its optimizer state are untouched; the pre-fit's own AdamW state is discarded.
"""

from __future__ import annotations

import time

import torch

from student_train.losses.objective import projected_ce


def prefit_projectors(distiller, batches, steps: int, lr: float, rank: int = 0, log_every: int = 10) -> dict:
    """Run ``steps`` micro-batches of ``batches`` through ``proj_ce`` and AdamW(``lr``) on ``query``/``t2s``.

    Every rank fits on its own micro-batches; the DeepSpeed engine built next broadcasts rank 0's parameters,
    so all ranks start the run with rank 0's projectors. Runs on the accelerator when there is one. Returns ``{"steps", "first", "last", "seconds"}`` (``proj_ce`` per
    token of the first and last step, on rank 0).
    """
    from student_train.model import _gathered_clone

    proj, objective = distiller.projectors, distiller.objective
    device = "cuda" if torch.cuda.is_available() else "cpu"
    proj.to(device)
    params = [*proj.query.parameters(), *proj.t2s.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    table = _gathered_clone(distiller.student.get_input_embeddings().weight).float().to(device)
    head = _gathered_clone(distiller.student.get_output_embeddings().weight).float().to(device)
    t_emb = distiller.teacher["embeddings"].to(device)
    first = last = float("nan")
    start = time.perf_counter()
    done = 0
    for done, batch in enumerate(batches, start=1):
        batch = batch.to(device)
        loss_sum, count = projected_ce(
            objective,
            proj,
            student_embeddings=table,
            student_head=head,
            student_input_ids=batch.input_ids,
            student_labels=batch.labels,
            teacher_hidden=batch.t_hidden,
            teacher_input_ids=batch.t_input_ids,
            teacher_labels=batch.t_labels,
            teacher_embeddings=t_emb,
            teacher_attention_mask=batch.t_mask,
        )
        loss = loss_sum / count.clamp_min(1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        last = float(loss)
        if done == 1:
            first = last
        if rank == 0 and (done % log_every == 0 or done == steps):
            print(f"[prefit] step {done}/{steps}: proj_ce {last:.4f} per token", flush=True)
        if done >= steps:
            break
    proj.to("cpu")  # back where the engine expects the module it wraps
    return {"steps": done, "first": first, "last": last, "seconds": time.perf_counter() - start}

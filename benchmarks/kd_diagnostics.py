"""Why does (or doesn't) distillation help? Per-term gradients of the objective on real batches.

    python benchmarks/kd_diagnostics.py --config configs/train/qwen_smollm2_dolly.yaml \
        --cache runs/quality-pair/cache-300-256 [--student runs/quality-pair/<run>/export] \
        [--preset dwa_kd] [--batches 4] [--set objective.accuracy_mask=false]

For each of the first --batches batches of the training schedule (seed --seed), with the student as given
(the config's, pruned as configured, or a trained export with its projectors), it reports for every term of
the objective: its weighted value per student token, the norm of its gradient on the student's weights and
on the projectors, and the cosine between its student gradient and the CE gradient (a KD term that pulls
against CE shows a negative cosine). Also: the fraction of student positions the accuracy mask keeps, the
teacher-to-student projection's own CE against the labels (a random projector sits near ln V_S), and the
DTW pairs. Prints a markdown table and writes --out JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    from pipeline.config import load_config
    from student_train.config import TrainConfig
    from student_train.data import Schedule, ScheduledBatches, collate_kwargs
    from student_train.losses.cma import Projectors
    from student_train.losses.config import TERM_NAMES
    from student_train.losses.objective import compute_terms
    from student_train.model import Distiller, load_student, load_student_tokenizer
    from teacher_cache.reader import open_cache

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--cache", required=True)
    ap.add_argument("--student", default=None, help="a trained export (its projectors are used when present)")
    ap.add_argument("--preset", default="dwa_kd")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="training config override"
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    over = [f"data.cache={args.cache}", f"objective.preset={args.preset}", *args.set]
    if args.student:
        over += [f"student.path={args.student}", "student.keep_layers=null"]  # an export is already pruned
    cfg = load_config(TrainConfig, REPO / args.config, over)
    obj = cfg.objective_config()
    if obj.logit_enabled:
        print(
            "this diagnostic covers the DSKD family (projector terms); use a dskd/dwa_kd preset",
            file=sys.stderr,
        )
        return 2
    torch.manual_seed(args.seed)
    cache = open_cache(args.cache)
    tok = load_student_tokenizer(cfg)
    student = load_student(cfg).train()
    d_s = student.get_input_embeddings().weight.shape[1]
    proj = Projectors(d_s, cache.hidden_size, dtw_embed=obj.dtw_enabled)
    from student_train.model import projectors_path

    proj_file = projectors_path(Path(args.student or ""))
    if args.student and proj_file.exists():
        from safetensors.torch import load_file

        proj.load_state_dict(load_file(str(proj_file)), strict=False)
    distiller = Distiller(student, proj, obj, cache.load_head()[0].float(), cache.load_embeddings().float())
    sched = Schedule(cache.shard_rows, 0, 1, cfg.train.micro_batch, args.seed, 256)
    from student_train.align import batch_alignment

    # what the objective reads besides the rows (e.g. eq (14)'s cached entropy)
    alignment, _ = batch_alignment(obj, cache, tok, cfg.data.teacher_tokenizer)
    kw = collate_kwargs(cfg, tok, with_teacher=True, alignment=alignment)
    s_params = [p for p in student.parameters() if p.requires_grad]
    p_params = list(proj.parameters())
    weight = {
        "ce": obj.lambda_ce,
        "proj_ce": obj.lambda_kd,
        "kd_student": obj.lambda_kd,
        "kd_teacher": obj.lambda_kd,
        "dtw_hidden": obj.lambda_dtw,
        "dtw_embed": obj.lambda_dtw,
        "logit_kd": obj.lambda_logit,
    }
    rows: list[dict] = []
    for i, batch in enumerate(ScheduledBatches(cache, sched, 0, 0, kw)):
        if i >= args.batches:
            break
        terms, counts = compute_terms(obj, distiller.objective_inputs(batch), proj)
        n = max(int(counts["student_tokens"]), 1)
        grads = {}
        for name in TERM_NAMES:
            t = terms[name]
            if not t.requires_grad or weight[name] == 0:
                continue
            g = torch.autograd.grad(
                weight[name] * t / n, s_params + p_params, retain_graph=True, allow_unused=True
            )
            gs = torch.cat(
                [
                    (x if x is not None else torch.zeros_like(p)).reshape(-1)
                    for x, p in zip(g[: len(s_params)], s_params)
                ]
            )
            gp = torch.cat(
                [
                    (x if x is not None else torch.zeros_like(p)).reshape(-1)
                    for x, p in zip(g[len(s_params) :], p_params)
                ]
            )
            grads[name] = (gs, gp, float(weight[name] * t.detach() / n))
        ce_g = grads.get("ce", (None,))[0]
        row = {
            "batch": i,
            "student_tokens": n,
            "accuracy_mask_keep": float(counts["kd_student_tokens"]) / n if obj.accuracy_mask else None,
            "proj_ce_per_token": float(terms["proj_ce"].detach()) / n,
            "ln_vocab": math.log(student.get_output_embeddings().weight.shape[0]),
            "dtw_pairs": int(counts["dtw_pairs"]),
            "terms": {},
        }
        for name, (gs, gp, val) in grads.items():
            cos = None
            if ce_g is not None and name != "ce" and gs.norm() > 0 and ce_g.norm() > 0:
                cos = float(torch.nn.functional.cosine_similarity(gs, ce_g, dim=0))
            row["terms"][name] = {
                "value": val,
                "grad_student": float(gs.norm()),
                "grad_projectors": float(gp.norm()),
                "cos_ce": cos,
            }
        rows.append(row)
        print(
            f"batch {i}: " + ", ".join(f"{k} |g|={v['grad_student']:.3g}" for k, v in row["terms"].items()),
            flush=True,
        )

    names = [k for k in TERM_NAMES if all(k in r["terms"] for r in rows)]

    def avg(key: str, name: str) -> str:
        vals = [r["terms"][name][key] for r in rows if r["terms"][name][key] is not None]
        return f"{statistics.mean(vals):.4g}" if vals else "-"

    print(
        f"\n{args.preset} on {args.student or cfg.student.path}: {len(rows)} batches of {cfg.train.micro_batch}"
    )
    print(
        "| term | weighted value / token | grad norm, student | grad norm, projectors | cos(grad, CE grad) |"
    )
    print("|---|---|---|---|---|")
    for name in names:
        print(
            f"| {name} | {avg('value', name)} | {avg('grad_student', name)} | {avg('grad_projectors', name)} | {avg('cos_ce', name)} |"
        )
    keep = [r["accuracy_mask_keep"] for r in rows if r["accuracy_mask_keep"] is not None]
    if keep:
        print(f"accuracy mask keeps {statistics.mean(keep):.1%} of student positions")
    print(
        f"proj_ce per token {statistics.mean(r['proj_ce_per_token'] for r in rows):.3f} "
        f"(ln V_S = {rows[0]['ln_vocab']:.3f}: a projector that has learnt nothing sits near it)"
    )
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "batches": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

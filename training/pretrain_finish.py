"""The end of a pretraining stage: the LoRA handover files, the summary against the majority
baseline, and the stage report (what the backbone still knows and what it learned)."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from common.console import say
from common.errors import UserError
from common.json_records import json_record
from custom_datasets import batch as B
from models.lora_checkpoints import save_adapters, save_merged_model
from models.visual_tokenizers import create_visual_tokenizer
from training.scaffold import last_step
from training.stage_eval import build_probes, format_report, stage_report
from training.stage_pictures import write_stage_pictures

if TYPE_CHECKING:
    from training.pretrain import Optimization, PretrainRun


@torch.no_grad()
def majority_baseline(loader, prepare) -> float:
    """Accuracy of always predicting the most frequent visual token of masked patches."""
    counts: dict[int, int] = {}
    total = 0
    for batch in prepare.batches(loader, "majority baseline"):
        ids = batch[B.VISUAL_TOKENS][batch[B.MASKED_PATCHES].bool()]
        for value, n in zip(*torch.unique(ids, return_counts=True)):
            counts[int(value)] = counts.get(int(value), 0) + int(n)
        total += ids.numel()
    return max(counts.values()) / total if total else 0.0


def report_visual_tokenizer(run: "PretrainRun", probes) -> object | None:
    """The stage's visual tokenizer, or for a stage that does not train MIM the one of the MIM probe
    (when the probes hold images and the tokenizer's weights are there)."""
    tok = run.cfg.visual_tokenizer
    if run.visual_tokenizer is not None or probes.images is None or not tok.d_vae_weight_path:
        return run.visual_tokenizer
    try:
        return create_visual_tokenizer(tok.d_vae_type, tok.d_vae_weight_path, tok.second_image_size,
                                       expected_grid=run.grid[0]).to(run.ctx.device)
    except UserError as err:
        say(f"stage report: no MIM accuracy ({err})")
        return None


def report_stage(run: "PretrainRun", name: str = "stage_report.json", pictures: bool = True,
                 writer=None) -> dict[str, Any]:
    """The forgetting / transfer metrics of this backbone on held-out probes, printed and saved; with
    `pictures`, what the heads see and predict on the same probes, drawn (also to TensorBoard)."""
    cfg = run.cfg
    heads = {**run.carried.modules, **{n: getattr(run.mode, n) for n in run.mode.heads}}
    probes = build_probes(cfg.data_config, run.mode.data_kind, run.grid, run.text_tokenizer, run.data.val,
                          run.data.val_collate, limit=cfg.data.max_val_samples or 500)
    visual_tokenizer = report_visual_tokenizer(run, probes)
    report, pair_scores = stage_report(run.backbone, heads, probes, run.ctx.device, visual_tokenizer,
                                       run.text_tokenizer, cfg.text.max_text_len, cfg.optim.batch_size, cfg.run.seed)
    say(f"stage report ({cfg.exp_name}): {format_report(report)}")
    if run.ctx.is_main:
        (run.ctx.output_dir / name).write_text(json_record(report, indent=1))
    if pictures and not cfg.run.no_pictures:
        write_stage_pictures(run, heads, probes, visual_tokenizer, pair_scores, writer, last_step(cfg.optim.epochs))
    return report


def save_lora_handover(run: "PretrainRun", gathered: dict | None = None) -> None:
    """`gathered`: a sharded run's full model state (rank 0), gathered before the report."""
    cfg, out = run.cfg, run.ctx.output_dir
    lora = {"rank": cfg.lora.lora_rank, "alpha": cfg.lora.lora_alpha}
    if not run.ctx.is_main:
        return
    own = gathered if gathered is not None else run.mode.state_dict()
    state = {**{k: v.detach().cpu() for k, v in own.items()}, **run.carried.tensors}
    save_adapters(out / "adapters.safetensors", state, run.backbone.cfg.to_dict(), lora, run.info())
    say(f"saved {out / 'adapters.safetensors'} (adapter weights only)")
    if cfg.lora.save_merged_lora_model:
        path = out / "merged_model.safetensors"
        save_merged_model(path, state, run.backbone.cfg.to_dict(), lora, str(out), run.info())
        say(f"saved {path} (adapters merged; start the next stage with --init_from {path})")


def finish_stage(run: "PretrainRun", optim: "Optimization", stats: dict[str, Any], seconds: float, writer=None,
                 gathered: dict | None = None) -> None:
    """After the last epoch (main process; a sharded run: every rank, rank 0 writes): handover files,
    summary line, stage report (into `stats`) and pictures."""
    if run.cfg.lora.lora_rank:
        save_lora_handover(run, gathered)
    summary = f"done in {seconds:.0f}s"
    if run.visual_tokenizer is not None and "test_acc_mim" in stats:
        baseline = majority_baseline(optim.val_loader, optim.prepare)
        summary += (f": held-out MIM accuracy {stats['test_acc_mim']:.3f} (always predicting the most frequent "
                    f"token: {baseline:.3f}; uniform chance: {1 / run.visual_tokenizer.vocab_size:.4f})")
        stats["majority_baseline"] = baseline
    if "test_loss_mae" in stats:
        summary += (f": held-out MAE loss {stats['test_loss_mae']:.3f} (the stage report's image_mae_r2 says how much "
                    f"of the masked pixels it explains: 0 for predicting " + ("each patch's mean" if
                    run.cfg.mae.norm_pix_loss else "zeros") + ")")
    say(summary)
    if (warning := contrastive_at_chance(stats, run.cfg.optim.batch_size * run.ctx.world)) is not None:
        say(warning)
    stats["stage_report"] = report_stage(run, writer=writer)


def contrastive_at_chance(stats: dict[str, Any], global_batch: int) -> str | None:
    """A sentence when the last epoch's image-text contrastive loss is still that of embeddings that
    tell nothing apart (ln of the batch's candidates): a collapsed or untrained stage says so, since
    its loss stays finite and nothing else would fail."""
    loss = stats.get("train_loss_itc")
    chance = math.log(global_batch) if global_batch > 1 else None
    if loss is None or chance is None or loss < 0.98 * chance:
        return None
    return (f"warning: the image-text contrastive loss ended at {loss:.3f}, chance level for {global_batch} candidates "
            f"(ln {global_batch} = {chance:.3f}): the stage learned nothing (its embeddings may have collapsed to "
            f"one); lower --blr / --lr, lengthen --warmup_epochs or train longer")

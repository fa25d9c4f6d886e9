"""ContinualTransformer's checkpoints, built from their documented layouts with random weights,
load through every entry point and give what their model computes (tests/ct_reference.py):
image and text features, MIM and MLM logits and ITC similarities within 1e-4 (fp32)."""
from __future__ import annotations

import argparse
import copy
import os

import dall_e
import pytest
import torch

from common.errors import UserError
from models import create_model
from models.checkpoints import read_model_checkpoint
from models.head_loading import load_head
from tests import ct_reference as ct
from tests.helpers import colour_folders, max_diff

TOL = 1e-4
D = ct.Dims()
RANK = 4
RUN = ["--image_size", "32", "--second_image_size", "32", "--data_path", "synthetic", "--synthetic_train_size", "16",
       "--synthetic_val_size", "8", "--synthetic_render_size", "32", "--batch_size", "8", "--num_workers", "0",
       "--print_freq", "100", "--drop_path", "0"]


def small_dall_e(seed: int = 0):
    torch.manual_seed(seed)
    return dall_e.encoder.Encoder(n_hid=16, vocab_size=D.visual_vocab, n_blk_per_group=1).eval()


def save(path, state, run: bool = False, epoch: int = 3, **args):
    obj = {"model": state}
    if run:  # what their util/misc.save_model writes
        obj.update(optimizer={"state": {}, "param_groups": []}, epoch=epoch, scaler={"scale": 65536.0},
                   args=argparse.Namespace(exp_name="image_mim", lora_rank=args.get("lora_rank", 0), image_size=D.image,
                                           max_text_len_of_initckpt=D.text_len, data_path=["x"], device="cuda"))
    torch.save(obj, path)
    return path


def with_dall_e(state):
    encoder = small_dall_e()
    return {**state, **{f"mim_processor.d_vae.encoder.{k}": v for k, v in encoder.state_dict().items()}}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Every format: converted BEiT init, run, LoRA run, released merged model (stale adapters)."""
    root = tmp_path_factory.mktemp("ct")
    gen = torch.Generator().manual_seed(0)
    init = ct.backbone_state(D, gen)
    init.update({f"transformer.blocks.{i}.attn.relative_position_index": torch.zeros(3, 3, dtype=torch.long)
                 for i in range(D.depth)})  # BEiT's buffers, kept by their converter
    init.update({"transformer.fc_norm.weight": torch.ones(D.dim), "transformer.fc_norm.bias": torch.zeros(D.dim),
                 "transformer.head.weight": torch.zeros(10, D.dim), "transformer.head.bias": torch.zeros(10)})
    run = ct.full_state(D, gen)
    lora = ct.full_state(D, gen, lora_rank=RANK)
    return {"init": (save(root / "beit_transfertovlmo.pth", init), init, 0),
            "run": (save(root / "checkpoint-3.pth", with_dall_e(run), run=True), run, 0),
            "lora_run": (save(root / "lora-checkpoint-3.pth", with_dall_e(lora), run=True, lora_rank=RANK), lora, RANK),
            "merged": (save(root / "checkpoint-merged-00042.pth", ct.merged(lora, RANK)), ct.merged(lora, RANK), 0)}


def check_backbone(backbone, state, lora_rank: int, text: bool = True) -> None:
    images, masked, ids, keep = ct.inputs(D)
    backbone.eval()
    with torch.no_grad():
        for m in (None, masked) if "mask_token" in state else (None,):  # a converted init has no mask token
            assert max_diff(backbone.encode_image(images, m), ct.image_features(state, D, images, m, lora_rank)) <= TOL
        if text:
            got, want = backbone.encode_text(ids, keep), ct.text_features(state, D, ids, keep, lora_rank)
            assert max_diff(got[keep.bool()], want[keep.bool()]) <= TOL  # padded positions carry no meaning


@pytest.mark.parametrize("kind", ["init", "run", "lora_run", "merged"])
def test_create_model_reproduces_their_outputs(files, kind):
    path, state, lora_rank = files[kind]
    backbone = create_model(None, pretrained=str(path))
    if kind == "lora_run":  # a LoRA run read as weights: its adapters are merged once
        state = ct.merged(state, RANK)
    check_backbone(backbone, state, 0, text=kind != "init")


@pytest.mark.parametrize("kind", ["run", "lora_run", "merged"])
def test_heads_reproduce_their_logits_and_similarities(files, kind):
    path, state, _ = files[kind]
    state = ct.merged(state, RANK) if kind == "lora_run" else state
    ckpt = read_model_checkpoint(path)
    backbone = create_model(None, pretrained=str(path), checkpoint=ckpt).eval()
    heads = {n: load_head(ckpt, n, backbone.cfg).eval() for n in ("mim_head", "mlm_head", "itc_head", "pooler")}
    images, masked, ids, keep = ct.inputs(D)
    with torch.no_grad():
        image = backbone.encode_image(images, masked)
        assert max_diff(heads["mim_head"](image), ct.mim_logits(state, D, ct.image_features(state, D, images, masked))) <= TOL
        text = backbone.encode_text(ids, keep)
        want_text = ct.text_features(state, D, ids, keep)
        assert max_diff(heads["mlm_head"](text)[keep.bool()], ct.mlm_logits(state, D, want_text)[keep.bool()]) <= TOL
        clean = backbone.encode_image(images)
        got = heads["itc_head"].scale() * heads["itc_head"].embed_image(clean[:, 0]) @ heads["itc_head"].embed_text(
            text[:, 0]).t()
        want = ct.itc_similarity(state, ct.image_features(state, D, images)[:, 0], want_text[:, 0])
        assert max_diff(got, want) <= TOL
        assert max_diff(heads["pooler"](text), torch.tanh(want_text[:, 0] @ state["pooler.dense.weight"].t()
                                                            + state["pooler.dense.bias"])) <= TOL


def test_a_namespace_checkpoint_that_carries_code_is_refused(tmp_path):
    torch.save({"model": {"w": torch.ones(1)}, "args": argparse.Namespace(cb=os.getcwd)}, tmp_path / "evil.pth")
    with pytest.raises(UserError, match="needs to run pickled code"):
        read_model_checkpoint(tmp_path / "evil.pth")


def test_the_carried_dall_e_encoder_gives_the_package_tokens(files):
    from models.visual_tokenizers import create_visual_tokenizer

    ckpt = read_model_checkpoint(files["run"][0])
    tokenizer = create_visual_tokenizer("dall-e", None, 32, encoder_tensors=ckpt.extra["dall_e_encoder"])
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        want = small_dall_e()(dall_e.map_pixels(images)).argmax(1).flatten(1)
    assert torch.equal(tokenizer.get_codebook_indices(images), want)


def capture_pretraining(monkeypatch) -> dict:
    """Runs main_pretrain_cook up to its first epoch and keeps the built run."""
    import training.pretrain as pretrain_module

    seen = {}

    def stop(run, optim, writer=None):
        seen.update(run=run, optim=optim)
        return {}, 0.0

    monkeypatch.setattr(pretrain_module, "train_epochs", stop)
    return seen


@pytest.mark.parametrize("kind, flag", [("init", "--resume"), ("run", "--init_from"), ("lora_run", "--init_from"),
                                        ("merged", "--resume"), ("run", "--resume"), ("lora_run", "--resume")])
def test_pretraining_entry_points(files, kind, flag, tmp_path, monkeypatch, capsys):
    from main_pretrain_cook import main

    path, state, rank = files[kind]
    seen = capture_pretraining(monkeypatch)
    main(["--exp_name", "image_mim", "--d_vae_type", "dall-e", flag, str(path), "--output_dir", str(tmp_path)] + RUN
         + ([] if kind in ("run", "lora_run") else ["--d_vae_weight_path", str(save_encoder_folder(tmp_path))]))
    run = seen["run"]
    continued = flag == "--resume" and kind in ("run", "lora_run")
    check_backbone(run.backbone, state if continued else (ct.merged(state, RANK) if rank else state),
                   RANK if continued and rank else 0, text=kind != "init")
    out = capsys.readouterr().out
    assert "ContinualTransformer checkpoint, read in this project's layout" in out
    if continued:
        assert seen["optim"].start_epoch == 4 and "continuing at epoch 4 with a fresh optimizer" in out
        assert (run.cfg.lora.lora_rank, run.cfg.lora.lora_alpha) == ((RANK, 1.0) if rank else (0, None))
    if kind in ("run", "lora_run"):  # their MIM head, with its transform, continues
        assert run.mode.mim_head.transform is not None and "loaded the mim_head" in out


def save_encoder_folder(tmp_path):
    folder = tmp_path / "dall_e"
    folder.mkdir(exist_ok=True)
    torch.save(small_dall_e(), folder / "encoder.pkl")
    return folder


@pytest.mark.parametrize("flag", ["--finetune", "--resume"])
def test_fine_tuning_entry_points(files, flag, tmp_path, monkeypatch):
    import training.finetune as finetune_module
    from main_finetune import main

    path, state, _ = files["run"]
    seen = {}
    real = finetune_module.build_task

    def keep(*args, **kwargs):
        task, report = real(*args, **kwargs)
        seen["task"] = copy.deepcopy(task)  # as loaded, before fine-tuning moves it
        return task, report

    monkeypatch.setattr(finetune_module, "build_task", keep)
    folders = colour_folders(tmp_path / "colours", 16, 8, render_size=32)
    main(["--task", "image_classification", "--data_path", str(folders), flag, str(path), "--lora_rank", "0",
          "--input_size", "32", "--epochs", "1", "--batch_size", "8", "--num_workers", "0", "--drop_path", "0",
          "--output_dir", str(tmp_path / "ft")])
    check_backbone(seen["task"].backbone, state, 0)


def test_converter_and_merge_script_read_their_files(files, tmp_path):
    from util.convert_beit_ckpt import main as convert
    from util.save_merged_lora_model import main as merge

    path, state, _ = files["run"]
    convert(["--input", str(path), "--output", str(tmp_path / "ours.safetensors")])
    check_backbone(create_model(None, pretrained=str(tmp_path / "ours.safetensors")), state, 0)
    lora_path, lora_state, _ = files["lora_run"]
    merge([str(lora_path), str(tmp_path / "merged.safetensors")])
    check_backbone(create_model(None, pretrained=str(tmp_path / "merged.safetensors")), ct.merged(lora_state, RANK), 0)
    with pytest.raises(SystemExit):  # their released merged model has no adapters left to merge
        merge([str(files["merged"][0]), str(tmp_path / "again.safetensors")])

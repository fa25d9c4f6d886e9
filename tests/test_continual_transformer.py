"""ContinualTransformer's files, written by its own code paths (tests/ct_writers.py: its model's
submodules, DALL-E encoder and decoder included, saved by its util/misc.py writers; BEiT checkpoints
put through its convert_pretrained_weight), load through every entry point and give what its model
computes (tests/ct_reference.py, or timm's BEiT for converted BEiT files): image and text features,
MIM and MLM logits and ITC similarities within 1e-4 (fp32)."""
from __future__ import annotations

import argparse
import copy
import os
import shutil

import dall_e
import pytest
import timm
import torch
import torch.nn.functional as F

from common.errors import UserError
from models import create_model
from models.checkpoints import read_model_checkpoint
from models.head_loading import load_head
from tests import ct_reference as ct
from tests import ct_writers as writers
from tests.helpers import colour_folders, max_diff, randomize_

TOL = 1e-4
D = ct.Dims()
RANK = 4
RUN = ["--image_size", "32", "--second_image_size", "32", "--data_path", "synthetic", "--synthetic_train_size", "16",
       "--synthetic_val_size", "8", "--synthetic_render_size", "32", "--batch_size", "8", "--num_workers", "0",
       "--print_freq", "100", "--drop_path", "0"]


def small_dall_e(seed: int = 0):
    torch.manual_seed(seed)
    return dall_e.encoder.Encoder(n_hid=16, vocab_size=D.visual_vocab, n_blk_per_group=1).eval()


def beit(shared_table: bool, seed: int):
    """A random BEiT as unilm's files hold it: pt22k (one shared table, final norm, mask token,
    lm_head) or fine-tuned (a table per block, fc_norm and head instead of the final norm)."""
    kind = dict(use_shared_rel_pos_bias=True, use_rel_pos_bias=False, global_pool="token") if shared_table else {}
    model = randomize_(timm.create_model("beit_base_patch16_224", pretrained=False, img_size=D.image,
                                         patch_size=D.patch, embed_dim=D.dim, depth=D.depth, num_heads=D.heads,
                                         num_classes=5, **kind), seed=seed).eval()
    state = dict(model.state_dict())
    index = torch.zeros(D.grid ** 2 + 1, D.grid ** 2 + 1, dtype=torch.long)  # unilm keeps the index buffers
    if shared_table:
        lm_head = randomize_(torch.nn.Linear(D.dim, D.visual_vocab), seed=seed + 1)
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        state.update({"mask_token": torch.randn(1, 1, D.dim), "lm_head.weight": lm_head.weight.detach(),
                      "lm_head.bias": lm_head.bias.detach(), "rel_pos_bias.relative_position_index": index})
        return model, state, lm_head
    state.update({f"blocks.{i}.attn.relative_position_index": index for i in range(D.depth)})
    return model, state, None


def their_model(rank: int, seed: int) -> writers.ContinualModel:
    return randomize_(writers.ContinualModel(D, rank), seed=seed)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(path, reference, LoRA rank) of each kind of file, written as their code writes it: BEiT
    through their converter, fine-tuned (per-layer tables) and pt22k (one shared table, lm_head),
    whose reference is timm's BEiT itself; an image_mim run (saved with an older transformers'
    position_ids), a text_mlm LoRA run with self-regularization, and the merged model their
    save_merged_lora_model writes of it (adapters kept in the state dict), whose reference is the
    state dict their model saved, computed by tests/ct_reference.py."""
    root = tmp_path_factory.mktemp("ct")
    ft, ft_state, _ = beit(shared_table=False, seed=0)
    pt, pt_state, lm_head = beit(shared_table=True, seed=5)
    run = their_model(0, seed=1)
    lora = their_model(RANK, seed=2)
    writers.mark_only_lora_as_trainable(lora)
    mlm_args = writers.their_args(exp_name="text_mlm", lora_rank=RANK, self_regularization=True, reg_loss_weight=10.0,
                                  data_file_path="data/CC3M/cc3m_captions.json")
    files = {
        # their model's own final norm, at its initial values, follows BEiT's blocks (the file has fc_norm instead)
        "init": (writers.convert_pretrained_weight(ft_state, writers.ContinualModel(D), root / "ft_transfertovlmo.pth"),
                 BeitReference(lambda x: F.layer_norm(ft.forward_features(x), (D.dim,), eps=1e-6)), 0),
        "pt22k": (writers.convert_pretrained_weight(pt_state, writers.ContinualModel(D), root / "pt_transfertovlmo.pth"),
                  BeitReference(pt.forward_features, lm_head), 0),
        "run": (writers.save_model(run, root / "checkpoint-3.pth", 3, writers.their_args(), old_transformers=True),
                dict(run.state_dict()), 0),
        "lora_run": (writers.save_model(lora, root / "lora-checkpoint-3.pth", 3, mlm_args),
                     {k: v.clone() for k, v in lora.state_dict().items()}, RANK)}
    files["merged"] = (writers.save_merged_model(lora, root / "checkpoint-merged-00042.pth"), dict(lora.state_dict()), 0)
    return files


class BeitReference:
    """BEiT's own computation (timm) of a converted BEiT file: features, and MIM logits of pt22k's head."""

    def __init__(self, features, lm_head=None) -> None:
        self.features, self.lm_head = features, lm_head


def check_backbone(backbone, state, lora_rank: int, text: bool = True) -> None:
    images, masked, ids, keep = ct.inputs(D)
    backbone.eval()
    with torch.no_grad():
        if isinstance(state, BeitReference):  # BEiT has no text path, and uses no mask token unmasked
            assert max_diff(backbone.encode_image(images), state.features(images)) <= TOL
            return
        for m in (None, masked):
            assert max_diff(backbone.encode_image(images, m), ct.image_features(state, D, images, m, lora_rank)) <= TOL
        if text:
            got, want = backbone.encode_text(ids, keep), ct.text_features(state, D, ids, keep, lora_rank)
            assert max_diff(got[keep.bool()], want[keep.bool()]) <= TOL  # padded positions carry no meaning


@pytest.mark.parametrize("kind", ["init", "pt22k", "run", "lora_run", "merged"])
def test_create_model_reproduces_their_outputs(files, kind):
    path, state, lora_rank = files[kind]
    backbone = create_model(None, pretrained=str(path))
    if kind == "lora_run":  # a LoRA run read as weights: its adapters are merged once
        state = ct.merged(state, RANK)
    check_backbone(backbone, state, 0)


def test_a_pt22k_checkpoint_through_their_converter_keeps_beits_shared_table_and_head(files):
    """Their converter prefixes BEiT's shared table and lm_head with `transformer.` (their own loader
    then drops them): every layer gets the table, as in BEiT, and the head predicts BEiT's tokens."""
    path, reference, _ = files["pt22k"]
    ckpt = read_model_checkpoint(path)
    backbone = create_model(None, pretrained=str(path), checkpoint=ckpt).eval()
    head = load_head(ckpt, "mim_head", backbone.cfg).eval()
    images, masked, _, _ = ct.inputs(D)
    with torch.no_grad():
        features = backbone.encode_image(images)
        assert max_diff(head(features[:, 1:]), reference.lm_head(reference.features(images)[:, 1:])) <= TOL
    notes = " ".join(ckpt.extra["conversion_notes"])
    assert "shared relative position table" in notes and "mim_head" not in ckpt.info["untrained"]


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


def their_dall_e(state: dict[str, torch.Tensor]):
    """The package's DALL-E encoder and decoder holding what their run saved under mim_processor.d_vae."""
    parts = writers.DalleVAE(D)
    parts.load_state_dict({k[len("mim_processor.d_vae."):]: v for k, v in state.items()
                           if k.startswith("mim_processor.d_vae.")})
    return parts.encoder.eval(), parts.decoder.eval()


def test_the_carried_dall_e_tokenizes_and_draws_as_the_package_does(files):
    """A run checkpoint carries the DALL-E its model held: the encoder gives the package's tokens, the
    decoder draws them as the package's decoder does."""
    from models.visual_tokenizers import create_visual_tokenizer, token_renderer

    path, state, _ = files["run"]
    ckpt = read_model_checkpoint(path)
    carried = {part: ckpt.extra[f"dall_e_{part}"] for part in ("encoder", "decoder")}
    tokenizer = create_visual_tokenizer("dall-e", None, 32, carried_dall_e=carried)
    encoder, decoder = their_dall_e(state)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ids = encoder(dall_e.map_pixels(images)).argmax(1).flatten(1)
        assert torch.equal(tokenizer.get_codebook_indices(images), ids)
        one_hot = F.one_hot(ids.view(2, 4, 4), D.visual_vocab).permute(0, 3, 1, 2).float()
        want = dall_e.unmap_pixels(torch.sigmoid(decoder(one_hot)[:, :3]))
        assert max_diff(token_renderer(tokenizer, None, 32)(ids), want) <= TOL


def capture_pretraining(monkeypatch) -> dict:
    """Runs main_pretrain_cook up to its first epoch and keeps the built run."""
    import training.pretrain as pretrain_module

    seen = {}

    def stop(run, optim, writer=None):
        seen.update(run=run, optim=optim)
        return {}, 0.0

    monkeypatch.setattr(pretrain_module, "train_epochs", stop)
    return seen


@pytest.mark.parametrize("kind, flag", [("init", "--resume"), ("pt22k", "--resume"), ("run", "--init_from"),
                                        ("lora_run", "--init_from"), ("merged", "--resume"), ("run", "--resume"),
                                        ("lora_run", "--resume"), ("run", "--auto_resume")])
def test_pretraining_entry_points(files, kind, flag, tmp_path, monkeypatch, capsys):
    from main_pretrain_cook import main

    path, state, rank = files[kind]
    seen = capture_pretraining(monkeypatch)
    if flag == "--auto_resume":  # their run's folder, continued in place
        shutil.copy(path, tmp_path / path.name)
        given = ["--auto_resume"]
    else:
        given = [flag, str(path)]
    carries_dall_e = kind in ("run", "lora_run")
    main(["--exp_name", "image_mim", "--d_vae_type", "dall-e", *given, "--output_dir", str(tmp_path)] + RUN
         + ([] if carries_dall_e else ["--d_vae_weight_path", str(save_encoder_folder(tmp_path))]))
    run = seen["run"]
    continued = flag in ("--resume", "--auto_resume") and carries_dall_e
    check_backbone(run.backbone, state if continued else (ct.merged(state, RANK) if rank else state),
                   RANK if continued and rank else 0)
    out = capsys.readouterr().out
    assert "ContinualTransformer checkpoint, read in this project's layout" in out
    if continued:
        assert seen["optim"].start_epoch == 4 and "continuing at epoch 4 with a fresh optimizer" in out
        assert (run.cfg.lora.lora_rank, run.cfg.lora.lora_alpha) == ((RANK, 1.0) if rank else (0, None))
    if carries_dall_e:  # their MIM head, with its transform, continues, and so does their tokenizer
        assert run.mode.mim_head.transform is not None and "loaded the mim_head" in out
        assert "the DALL-E encoder and decoder carried by the checkpoint" in out
        assert run.visual_tokenizer.carried_decoder is not None  # what draws the pictures
    if kind == "pt22k":  # BEiT's lm_head, without a transform
        assert run.mode.mim_head.transform is None and "loaded the mim_head" in out


def save_encoder_folder(tmp_path):
    folder = tmp_path / "dall_e"
    folder.mkdir(exist_ok=True)
    torch.save(small_dall_e(), folder / "encoder.pkl")
    return folder


@pytest.mark.parametrize("flag", ["--finetune", "--resume"])
def test_fine_tuning_entry_points(files, flag, tmp_path, monkeypatch):
    import training.finetune as finetune_module
    from main_finetune import main

    path, state, _ = files["run" if flag == "--resume" else "pt22k"]
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
    convert(["--input", str(path), "--output", str(tmp_path / "ours.safetensors"), "--dall_e_output",
             str(tmp_path / "dall_e")])
    check_backbone(create_model(None, pretrained=str(tmp_path / "ours.safetensors")), state, 0)
    from models.visual_tokenizers import create_visual_tokenizer

    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():  # the tokenizer it carried, written out as files --d_vae_weight_path reads
        want = their_dall_e(state)[0](dall_e.map_pixels(images)).argmax(1).flatten(1)
    tokenizer = create_visual_tokenizer("dall-e", tmp_path / "dall_e", 32)
    assert torch.equal(tokenizer.get_codebook_indices(images), want)
    assert sorted(p.name for p in (tmp_path / "dall_e").iterdir()) == ["decoder.safetensors", "encoder.safetensors"]
    for kind in ("pt22k", "init"):
        out = tmp_path / f"{kind}.safetensors"
        convert(["--input", str(files[kind][0]), "--output", str(out)])
        check_backbone(create_model(None, pretrained=str(out)), files[kind][1], 0)
    lora_path, lora_state, _ = files["lora_run"]
    merge([str(lora_path), str(tmp_path / "merged.safetensors")])
    check_backbone(create_model(None, pretrained=str(tmp_path / "merged.safetensors")), ct.merged(lora_state, RANK), 0)
    with pytest.raises(SystemExit):  # their released merged model has no adapters left to merge
        merge([str(files["merged"][0]), str(tmp_path / "again.safetensors")])

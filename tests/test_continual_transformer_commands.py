"""ContinualTransformer's README commands, as written, in a folder laid out as their README lays it
out (checkpoints/, data/), with stand-ins for what users bring: a random BEiT-base in place of the
released one, a small random DALL-E encoder pickled as OpenAI did, a WordPiece vocabulary in
checkpoints/bert-base-uncased/, and a few captions and images. Each command runs on two gloo
processes launched with `python -m torch.distributed.launch` and logs its first steps; only the
batch size, epochs and workers are shrunk (appended flags win)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import dall_e
import pytest
import timm
import torch

from custom_datasets.pair_data import caption_texts
from custom_datasets.synthetic_world import SyntheticWorld
from models.text_tokenizer import train_wordpiece
from tests.distributed_harness import free_port
from tests.helpers import ROOT, colour_folders

BEIT = "checkpoints/beit_base_patch16_224_pt22k_ft22kto1k.pth"
CONVERTED = "checkpoints/beit_base_patch16_224_pt22k_ft22kto1k_transfertovlmo.pth"
SMALL = ["--batch_size", "2", "--epochs", "1", "--num_workers", "0", "--print_freq", "1"]
LAUNCH = [sys.executable, "-m", "torch.distributed.launch", "--nnodes=1", "--nproc_per_node=2"]

TEXT_MLM = ("--exp_name text_mlm --model vlmo_base_patch16 --data_path data/CC3M/cc3m_captions.json --batch_size 384 "
            "--output_dir outputs/text_mlm/ --log_dir outputs/text_mlm/ --resume " + CONVERTED + " --lora_rank 64 "
            "--reg_loss_weight 1e1 --self_regularization --save_per_epochs 20 --epochs 100 --warmup_epochs 40 "
            "--blr 1.5e-4 --weight_decay 0.05").split()
IMAGE_MIM = ("--exp_name image_mim --model vlmo_base_patch16 --data_path data/ILSVRC2012/train/ --batch_size 128 "
             "--output_dir outputs/image_mim/ --log_dir outputs/image_mim/ --lora_rank 0 --save_per_epochs 20 "
             "--epochs 800 --warmup_epochs 40 --blr 1.5e-4 --weight_decay 0.05").split()


def run(cwd, argv, launch: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}
    command = (LAUNCH if launch else [sys.executable]) + argv
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Their folder layout with stand-ins, and their conversion step already run (as written)."""
    root = tmp_path_factory.mktemp("ct_user")
    (root / "checkpoints" / "dall_e_tokenizer_weight").mkdir(parents=True)
    torch.manual_seed(0)
    torch.save({"model": timm.create_model("beit_base_patch16_224", pretrained=False).state_dict()}, root / BEIT)
    torch.save(dall_e.encoder.Encoder(n_hid=16, vocab_size=512, n_blk_per_group=1),
               root / "checkpoints" / "dall_e_tokenizer_weight" / "encoder.pkl")
    train_wordpiece(caption_texts(["synthetic"], 500, 0), 300, root / "checkpoints" / "bert-base-uncased")
    (root / "data" / "CC3M").mkdir(parents=True)
    world = SyntheticWorld("train", 24, seed=0)
    (root / "data" / "CC3M" / "cc3m_captions.json").write_text(json.dumps([{"caption": world.scene(i).caption}
                                                                          for i in range(24)]))
    colour_folders(root / "data" / "ILSVRC2012", 8, 4, render_size=48)
    converted = run(root, ["util/convert_beit_ckpt.py".replace("util", str(ROOT / "util"))])
    assert converted.returncode == 0, converted.stderr
    yield root
    # BEiT-base weights, optimizer states and fine-tuned copies: 3.3 GB, freed when the module ends
    shutil.rmtree(root, ignore_errors=True)


def test_convert_with_no_arguments_writes_their_file_name(workspace):
    assert (workspace / CONVERTED).is_file()
    again = run(workspace, [str(ROOT / "util" / "convert_beit_ckpt.py")])
    assert again.returncode == 2 and "already exists; pass --overwrite" in again.stderr


@pytest.mark.slow  # 50 s: BEiT-base through their text command and fine-tuning; over the default suite's budget
def test_their_text_mlm_command_then_their_downstream_flags(workspace):
    result = run(workspace, [str(ROOT / "main_pretrain_cook.py")] + TEXT_MLM + SMALL, launch=True)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "reading it as --data_file_path" in out and "2 process(es)" in out
    assert "Epoch [0] [1/" in out and "loss_reg" in out  # the first logged step, self-regularization on
    assert "initialising the model from it" in out  # --resume of a weights file: initialise
    assert (workspace / "outputs" / "text_mlm" / "checkpoint-0.pth").is_file()
    labels = workspace / "data" / "labels.csv"
    world = SyntheticWorld("train", 24, seed=0)
    labels.write_text("text,label\n" + "\n".join(f"{world.scene(i).caption},{world.scene(i).label}" for i in range(24)))
    downstream = run(workspace, [str(ROOT / "main_finetune.py"), "--task", "text_classification", "--data_file_path",
                                 str(labels), "--lora_rank", "0", "--resume", "outputs/text_mlm/checkpoint-0.pth",
                                 "--input_size", "224"] + SMALL)
    assert downstream.returncode == 0, downstream.stderr[-3000:]
    assert "loaded: backbone" in downstream.stdout and "Epoch [0] [1/" in downstream.stdout


def test_their_image_mim_command_uses_the_dall_e_encoder_where_they_keep_it(workspace):
    result = run(workspace, [str(ROOT / "main_pretrain_cook.py")] + IMAGE_MIM + SMALL, launch=True)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "visual tokenizer: the DALL-E encoder in checkpoints/dall_e_tokenizer_weight/" in out
    assert "visual tokenizer dall-e (512 tokens)" in out and "Epoch [0] [1/" in out

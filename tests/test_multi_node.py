"""Two "nodes" on this machine (two torchrun launchers, `--nnodes 2 --node_rank {0,1}
--rdzv_backend c10d`, one gloo process each) train the image MIM and the image-text (ITC, negatives
gathered across ranks) stages to exactly the weights of one node with two processes; the log names
the nodes; one checkpoint is written; a node killed mid-run (its launcher and worker) ends the other
within seconds, its worker saying so in one sentence."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.distributed_harness import free_port
from tests.helpers import ROOT

pytestmark = pytest.mark.slow  # four torchrun runs per stage

FLAGS = ["--device", "cpu", "--model", "vlmo_tiny_patch16", "--image_size", "32", "--patch_size", "8",
         "--second_image_size", "16", "--visual_vocab_size", "16", "--tokenizer_fit_images", "64", "--batch_size", "4",
         "--num_workers", "0", "--data_path", "synthetic", "--synthetic_train_size", "32", "--synthetic_val_size", "16",
         "--synthetic_render_size", "32", "--min_mask_patches_per_block", "4", "--no_pictures"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _one_node(out, *extra) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / "main_pretrain_cook.py"), *FLAGS, "--output_dir", str(out), *extra]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


def _node(rank: int, port: int, out, *extra) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node",
           "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", str(ROOT / "main_pretrain_cook.py"),
           *FLAGS, "--output_dir", str(out), *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _two_nodes(out, *extra) -> list[str]:
    port = free_port()
    nodes = [_node(rank, port, out, *extra) for rank in range(2)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), outputs[0][-3000:] + outputs[1][-3000:]
    return outputs


def _weights(path):
    from models.checkpoints import read_model_checkpoint

    return read_model_checkpoint(str(path)).model


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from custom_datasets.pair_data import caption_texts
    from models.text_tokenizer import train_wordpiece

    folder = tmp_path_factory.mktemp("tok") / "tok"
    train_wordpiece(caption_texts(["synthetic"], 500, 0), 200, folder)
    return str(folder)


@pytest.mark.parametrize("stage", ["image_mim", "image_text_itc"])
def test_two_nodes_train_what_one_node_with_two_processes_trains(tmp_path, tokenizer, stage):
    extra = ["--exp_name", stage, "--epochs", "1", "--tokenizer", tokenizer]
    one = _one_node(tmp_path / "one", *extra)
    assert one.returncode == 0, one.stderr[-3000:]
    outputs = _two_nodes(tmp_path / "two", *extra)
    log = "".join(outputs)
    assert "2 processes on 2 nodes (this is node" in log
    assert sorted(p.name for p in (tmp_path / "two").glob("checkpoint-*")) == ["checkpoint-0.pth"]
    a, b = _weights(tmp_path / "one" / "checkpoint-0.pth"), _weights(tmp_path / "two" / "checkpoint-0.pth")
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.allclose(value.float(), b[key].float(), atol=1e-6, rtol=0), key


def _kill_node(pid: int) -> None:
    """The launcher and every process under it (torchrun starts its workers in sessions of their
    own, so killing the launcher's group alone would leave its worker training on)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += children.get(current, [])
    for member in tree:
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_node_that_dies_ends_the_other_within_seconds(tmp_path):
    port = free_port()
    nodes = [_node(rank, port, tmp_path / "run", "--epochs", "200", "--synthetic_train_size", "64") for rank in range(2)]
    try:
        deadline = time.time() + 120
        while not (tmp_path / "run" / "log.txt").is_file() and time.time() < deadline:  # training has begun
            time.sleep(0.5)
        assert (tmp_path / "run" / "log.txt").is_file()
        _kill_node(nodes[1].pid)
        killed = time.time()
        output = nodes[0].communicate(timeout=90)[0]
        assert nodes[0].returncode != 0 and time.time() - killed < 60
        # its worker says so in one sentence, or its launcher stops first (the rendezvous lived on the dead node)
        assert "another process of this run stopped" in output or "RendezvousConnectionError" in output
    finally:
        for node in nodes:
            if node.poll() is None:
                _kill_node(node.pid)

"""Weights by name, against loopback servers that serve files in each publisher's format (random
weights): a plain file server (as unilm's, MAE's and OpenAI's) and one that answers as the Hugging
Face hub does, through HF_ENDPOINT. The name's weights equal the same file read from disk; a file
corrupted in transit is refused and fetched again, never loaded; a dropped connection leaves no file
a later run takes for whole; a 404 and an offline machine are one sentence naming the URL and where
to put the file; two processes fetching at once get one download."""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from pathlib import Path

import pytest
import torch

from common.errors import UserError
from models.checkpoints import read_model_checkpoint
from tests.helpers import ROOT, randomize_
from tests.mae_reference import MaskedAutoencoderViT, save_released
from experiments.loopback_server import start_loopback_server

SIZES = dict(img_size=32, patch_size=8, embed_dim=128, depth=2, num_heads=2, decoder_embed_dim=64, decoder_depth=1,
             decoder_num_heads=2)


@pytest.fixture()
def served(tmp_path, monkeypatch):
    """(the server's folder, its base URL): torch's and the hub's caches in tmp_path."""
    root = tmp_path / "served"
    root.mkdir()
    server, port = start_loopback_server([str(ROOT / "tests" / "weights_server.py"), str(root), "{port}"])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    _reload_hub_constants()
    yield root, f"http://127.0.0.1:{port}"
    server.kill()
    server.wait()
    _reload_hub_constants()


def _reload_hub_constants():
    """huggingface_hub reads its environment when imported; the tests change it."""
    import importlib

    import huggingface_hub.constants as constants

    importlib.reload(constants)
    for module in ("huggingface_hub.file_download", "huggingface_hub.utils._http", "huggingface_hub.hf_api"):
        mod = importlib.import_module(module)
        if hasattr(mod, "constants"):
            mod.constants = constants


def _mae_file(folder: Path) -> Path:
    torch.manual_seed(0)
    ref = randomize_(MaskedAutoencoderViT(**SIZES), scale=0.1)
    path = folder / "mae_visualize_vit_test.pth"
    save_released(ref, path, encoder_only=False)
    return path


def _requests(root: Path, name: str) -> int:
    log = root / "requests.log"
    return sum(line == f"GET {name}" for line in log.read_text().splitlines()) if log.is_file() else 0


def _same(a: Path | str, b: Path | str) -> None:
    ca, cb = read_model_checkpoint(a), read_model_checkpoint(b)
    assert ca.model.keys() == cb.model.keys() and all(torch.equal(ca.model[k], cb.model[k]) for k in ca.model)


def test_a_url_is_fetched_once_checked_and_loads_as_the_file_on_disk(served, capsys):
    from conversion.named_weights import resolve

    root, base = served
    original = _mae_file(root)
    local = resolve(f"{base}/mae_visualize_vit_test.pth", "--init_from")
    _same(local, original)
    assert Path(local).parent == Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints"
    assert resolve(f"{base}/mae_visualize_vit_test.pth", "--init_from") == local  # cached: not fetched again
    assert _requests(root, "mae_visualize_vit_test.pth") == 1


def test_a_file_corrupted_in_transit_is_refused_and_fetched_again(served, capsys):
    from common.downloads import Expected, fetch_url, sha256_of

    root, base = served
    original = _mae_file(root)
    (root / "faults.json").write_text(json.dumps({original.name: "corrupt_once"}))
    local = fetch_url(f"{base}/{original.name}", Expected(sha256=sha256_of(original)))
    assert "the download is not the file (its sha256 does not start with" in capsys.readouterr().out
    assert sha256_of(local) == sha256_of(original) and _requests(root, original.name) == 2


def test_a_dropped_connection_leaves_no_file_taken_for_whole(served, capsys):
    from common.downloads import cache_dir, fetch_url

    root, base = served
    original = _mae_file(root)
    (root / "faults.json").write_text(json.dumps({original.name: "drop_always"}))
    with pytest.raises(UserError, match=r"could not be fetched whole .*put it at"):
        fetch_url(f"{base}/{original.name}")  # no hash known: the announced length catches it
    assert not list(cache_dir().glob(f"{original.name}*[!k]"))  # neither the file nor a .partial (the lock stays)
    (root / "faults.json").write_text(json.dumps({original.name: "drop_once"}))
    _same(fetch_url(f"{base}/{original.name}"), original)  # the next run fetches it whole


def test_a_404_and_an_offline_machine_say_where_to_put_the_file(served, monkeypatch):
    from common.downloads import cache_dir, fetch_url

    _, base = served
    with pytest.raises(UserError, match=rf"{base}/nowhere.pth answered HTTP 404 .* put it at {cache_dir()}/nowhere.pth"):
        fetch_url(f"{base}/nowhere.pth")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="is not in the cache and HF_HUB_OFFLINE is set"):
        fetch_url(f"{base}/nowhere.pth")


def _fetch_in_process(url: str, env: dict, out: Path) -> None:
    os.environ.update(env)
    from common.downloads import fetch_url

    out.write_text(str(fetch_url(url)))


def test_two_processes_fetching_at_once_get_one_download(served, tmp_path):
    root, base = served
    original = _mae_file(root)
    env = {k: os.environ[k] for k in ("TORCH_HOME", "HF_HOME", "HF_ENDPOINT")}
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_fetch_in_process, args=(f"{base}/{original.name}", env, tmp_path / f"p{i}"))
             for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert (tmp_path / "p0").read_text() == (tmp_path / "p1").read_text()
    _same((tmp_path / "p0").read_text(), original)
    assert _requests(root, original.name) == 1


def _write_hub_repo(root: Path, repo: str, model) -> Path:
    folder = root / repo
    model.save_pretrained(folder)
    return folder


def test_hf_hub_names_come_through_the_hub_protocol_and_its_cache(served):
    import transformers

    from conversion.named_weights import resolve
    from tests.test_mae_equivalence import _hf_model

    root, _ = served
    original = _write_hub_repo(root, "facebook/vit-mae-test", _hf_model(norm_pix=True))
    local = resolve("hf-hub:facebook/vit-mae-test", "--init_from")
    assert Path(os.environ["HF_HOME"]) in Path(local).parents  # the hub's own cache layout
    _same(local, original)
    # a BEiT repository is converted once, the result cached beside torch's downloads
    beit = transformers.BeitModel(transformers.BeitConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                          intermediate_size=256, image_size=32, patch_size=8,
                                                          layer_norm_eps=1e-6, use_relative_position_bias=True))
    _write_hub_repo(root, "microsoft/beit-test", beit)
    converted = resolve("hf-hub:microsoft/beit-test@main", "--init_from")
    assert converted.endswith(".safetensors") and read_model_checkpoint(converted).backbone_config["embed_dim"] == 64
    assert resolve("hf-hub:microsoft/beit-test@main", "--init_from") == converted
    with pytest.raises(UserError, match="hf-hub:nobody/nothing has none of model.safetensors, pytorch_model.bin"):
        resolve("hf-hub:nobody/nothing", "--init_from")


def test_a_registered_name_runs_a_stage(served, tmp_path, monkeypatch, capsys):
    """--init_from NAME: the registry's URL (here the loopback server's), fetched, then a stage starts."""
    import conversion.named_weights as named
    from main_pretrain_cook import main
    from tests.test_pretrain_cli import SYNTH, TINY_BASE

    root, base = served
    shutil.copy(_mae_file(root), root / "mae_pretrain_vit_test.pth")
    monkeypatch.setitem(named.REGISTRY, "mae_test", named.NamedWeights(f"{base}/mae_pretrain_vit_test.pth", "mae",
                                                                       "a test", "none"))
    out = tmp_path / "run"
    unnamed = [a for i, a in enumerate(TINY_BASE) if "--model" not in TINY_BASE[max(i - 1, 0):i + 1]]
    main(unnamed + SYNTH + ["--exp_name", "image_mae", "--init_from", "mae_test", "--epochs", "1", "--no_pictures",
                            "--output_dir", str(out)])
    said = capsys.readouterr().out
    assert "--init_from mae_test: " in said and "loaded the mae_decoder" in said
    assert (out / "checkpoint-0.pth").is_file()


def test_the_list_names_every_registered_weight_with_size_and_licence(capsys):
    from conversion.named_weights import REGISTRY
    from util.convert_beit_ckpt import main as convert

    convert(["--list"])
    said = capsys.readouterr().out
    for name, entry in REGISTRY.items():
        assert f"| {name} | {entry.what} | {entry.size} | {entry.licence} |" in said
    assert {"beit_base_patch16_224_pt22k", "beitv2_base_patch16_224_pt1k", "dall_e_encoder", "mae_pretrain_vit_base",
            "vqkd_encoder_base_decoder_3x768x12_clip", "bert-base-uncased"} <= set(REGISTRY)


def test_the_dall_e_encoder_by_name_is_the_folder_d_vae_weight_path_takes(served, monkeypatch):
    import conversion.named_weights as named

    root, base = served
    (root / "encoder.pkl").write_bytes(b"OpenAI's pickle would be here")
    monkeypatch.setitem(named.REGISTRY, "dall_e_test", named.NamedWeights(f"{base}/encoder.pkl", "dall_e", "a test",
                                                                          "none"))
    folder = Path(named.resolve("dall_e_test", "--d_vae_weight_path"))
    assert (folder / "encoder.pkl").read_bytes() == b"OpenAI's pickle would be here"
    assert named.resolve("dall_e_test", "--d_vae_weight_path") == str(folder)


def test_a_name_is_not_fetched_when_an_experiment_only_checks_its_runs(tmp_path):
    from training.cli import check_planned_pretrain_run
    from tests.test_pretrain_cli import SYNTH, TINY_BASE

    # no server, no cache: checking the command must not try to download
    check_planned_pretrain_run(TINY_BASE + SYNTH + ["--exp_name", "image_mae", "--init_from", "mae_pretrain_vit_base",
                                                    "--output_dir", str(tmp_path / "o")])

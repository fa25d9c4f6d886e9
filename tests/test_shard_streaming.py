"""Shards streamed from real servers on the loopback interface: an S3-compatible one (moto's
standalone server) and a plain HTTP one (`python -m http.server`), read through fsspec, give the
samples the files give; a shard that disappears, a connection dropped mid-shard and a server that
never answers are retried, then skipped with a count, within bounded time. Sources given as
`A::B` with weights are mixed in exactly those shares, as reported. Secrets in URLs are never
printed or recorded."""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time

import pytest
import yaml
from torch.utils.data import DataLoader

from common.errors import UserError
from common.url_secrets import masked_url
from custom_datasets.collate import collate_skipping_bad
from custom_datasets.webdataset_pairs import WebDatasetPairs, expand_shards, read_shard
from main_pretrain_cook import main
from tests.test_pretrain_cli import TINY_BASE
from tests.test_webdataset import make_shards
from experiments.loopback_server import start_loopback_server

pytest.importorskip("s3fs")
pytest.importorskip("moto")

SECRET = "s3cr3t-value-never-printed"


def _signature(samples) -> list:
    return [None if s is None else (s["caption"], s["image"].tobytes()) for s in samples]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("wds") / "wds")


@pytest.fixture(scope="module")
def s3(shards):
    """A moto S3 server on loopback with the shards in bucket `shards` under `wds/`; the client
    finds it and its credentials through the environment, as boto does."""
    import boto3

    server, port = start_loopback_server(["-m", "moto.server", "-H", "127.0.0.1", "-p", "{port}"])
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    client = boto3.client("s3")
    client.create_bucket(Bucket="shards")
    for shard in sorted(shards.glob("*.tar")):
        client.upload_file(str(shard), "shards", f"wds/{shard.name}")
    yield client
    server.kill()
    for key, value in saved.items():
        os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


def test_s3_shards_by_brace_range_and_by_listing_read_as_the_files_do(shards, s3):
    local = expand_shards(str(shards))
    by_range = expand_shards("s3://shards/wds/{00000..00002}.tar")
    assert by_range == [f"s3://shards/wds/{i:05d}.tar" for i in range(3)]
    assert expand_shards("s3://shards/wds/*.tar") == by_range
    for file, url in zip(local, by_range):
        assert _signature(read_shard(url, timeout=10)) == _signature(read_shard(file))


def test_http_shards_read_as_the_files_do_and_a_run_streams_them(shards, tmp_path):
    """http.server answers no range requests: a shard longer than fsspec's blocks (5 MB) is one GET."""
    from util.train_text_tokenizer import main as train_tokenizer

    import tarfile

    folder = tmp_path / "served"
    folder.mkdir()
    for shard in sorted(shards.glob("*.tar")):
        (folder / shard.name).write_bytes(shard.read_bytes())
    with tarfile.open(shards / "00001.tar") as source, tarfile.open(folder / "00003.tar", "w") as big:
        for member in source:
            big.addfile(member, source.extractfile(member))
            padding = tarfile.TarInfo(member.name.split(".")[0] + ".bin")
            padding.size = 2 << 20
            big.addfile(padding, __import__("io").BytesIO(os.urandom(padding.size)))
    server, port = start_loopback_server(["-m", "http.server", "{port}", "--bind", "127.0.0.1", "--directory",
                                          str(folder)])
    try:
        urls = expand_shards(f"http://127.0.0.1:{port}/{{00000..00003}}.tar")
        for file, url in zip(expand_shards(str(folder)), urls):
            assert _signature(read_shard(url, timeout=10)) == _signature(read_shard(file))
        tok = train_tokenizer(["--data_file_path", "synthetic", "--vocab_size", "100", "--output", str(tmp_path / "tok")])
        out = tmp_path / "run"
        main(TINY_BASE + ["--exp_name", "image_text_itc", "--webdataset", "--data_path",
                     f"http://127.0.0.1:{port}/{{00000..00002}}.tar", "--train_num_samples", "16", "--eval_data_path",
                     str(make_shards(tmp_path / "val", n_shards=1, bad=0)), "--tokenizer", str(tok), "--epochs", "1",
                     "--output_dir", str(out)])
        assert json.loads((out / "log.txt").read_text().splitlines()[0])["train_skipped_samples"] == 1
    finally:
        server.kill()


def test_cli_streams_from_s3_and_records_no_secret(tmp_path, shards, s3, capsys):
    from util.train_text_tokenizer import main as train_tokenizer

    tok = train_tokenizer(["--data_file_path", "synthetic", "--vocab_size", "100", "--output", str(tmp_path / "tok")])
    val = make_shards(tmp_path / "val", n_shards=1, bad=0)
    out = tmp_path / "run"
    main(TINY_BASE + ["--exp_name", "image_text_itc", "--webdataset", "--data_path", "s3://shards/wds/{00000..00002}.tar",
                 "--train_num_samples", "16", "--eval_data_path", str(val), "--tokenizer", str(tok), "--epochs", "1",
                 "--output_dir", str(out), "--shard_timeout", "10"])
    log = json.loads((out / "log.txt").read_text().splitlines()[0])
    assert log["train_skipped_samples"] == 1 and "test_acc_i2t" in log  # the one bad member of shard 0
    printed = capsys.readouterr()
    assert "s3://shards/wds/{00000..00002}.tar" in printed.out
    for path in out.rglob("*"):
        if path.is_file() and path.suffix in (".yaml", ".txt", ".json"):
            assert SECRET not in path.read_text(errors="ignore"), path
    assert SECRET not in printed.out + printed.err


def test_a_shard_gone_from_the_bucket_is_retried_then_skipped_with_a_count(shards, s3, caplog):
    s3.upload_file(str(shards / "00001.tar"), "shards", "wds/doomed.tar")
    listed = expand_shards("s3://shards/wds/*.tar")
    assert "s3://shards/wds/doomed.tar" in listed
    s3.delete_object(Bucket="shards", Key="wds/doomed.tar")
    start = time.time()
    with caplog.at_level(logging.WARNING):
        assert list(read_shard("s3://shards/wds/doomed.tar", retries=2, timeout=5)) == []
    assert time.time() - start < 30
    messages = [r.getMessage() for r in caplog.records]
    assert sum("trying again" in m for m in messages) == 2 and "after 3 tries" in messages[-1]


class _BrokenServer:
    """HTTP on loopback that announces a whole shard, sends `cut` bytes of it, then drops the
    connection (cut=None: accepts and never answers). One connection at a time."""

    def __init__(self, payload: bytes, cut: int | None) -> None:
        self.payload, self.cut, self.requests = payload, cut, 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.requests += 1
            conn.recv(65536)
            if self.cut is None:
                self.held.append(conn)  # never answered
                continue
            head = (f"HTTP/1.1 200 OK\r\nContent-Length: {len(self.payload)}\r\nContent-Type: application/x-tar\r\n"
                    f"Accept-Ranges: none\r\nConnection: close\r\n\r\n").encode()
            conn.sendall(head + self.payload[:self.cut])
            time.sleep(0.5)  # the client reads what arrived, then the connection drops
            conn.close()

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


def test_a_connection_dropped_mid_shard_is_retried_then_skipped_keeping_what_was_read(shards, caplog):
    payload = (shards / "00002.tar").read_bytes()
    whole = _signature(read_shard(shards / "00002.tar"))
    server = _BrokenServer(payload, cut=len(payload) // 2)
    try:
        start = time.time()
        with caplog.at_level(logging.WARNING):
            got = _signature(read_shard(f"http://127.0.0.1:{server.port}/00002.tar", retries=2, timeout=5))
        assert time.time() - start < 30
        assert 0 < len(got) < len(whole) and got == whole[:len(got)]  # each sample once, in order
        messages = [r.getMessage() for r in caplog.records]
        assert sum("trying again" in m for m in messages) == 2 and "after 3 tries" in messages[-1]
    finally:
        server.close()


def test_a_server_that_never_answers_times_out_within_bounds(shards, caplog):
    server = _BrokenServer(b"", cut=None)
    try:
        start = time.time()
        with caplog.at_level(logging.WARNING):
            assert list(read_shard(f"http://127.0.0.1:{server.port}/00000.tar", retries=1, timeout=1)) == []
        assert time.time() - start < 20 and server.requests >= 2  # opened twice (fsspec may probe first)
        assert "after 2 tries" in caplog.records[-1].getMessage()
    finally:
        server.close()


@pytest.mark.parametrize("workers", [0, 2])
def test_mixed_shard_sources_take_exactly_their_weights_as_reported(tmp_path, workers):
    a = make_shards(tmp_path / "a", n_shards=2, per_shard=6, bad=0)
    b = make_shards(tmp_path / "b", n_shards=2, per_shard=6, bad=0)
    for shard in sorted(b.glob("*.tar")):  # B's captions say so
        renamed = tmp_path / "b2" / shard.name
        renamed.parent.mkdir(exist_ok=True)
        _recaption(shard, renamed, "from B")
    data = WebDatasetPairs([expand_shards(str(a)), expand_shards(str(tmp_path / "b2"))], 40,
                           lambda image, key=None: {"size": image.size[0]}, weights=[3, 1], names=["A", "B"])
    for epoch in (0, 1):
        data.set_epoch(epoch)
        captions = [c for batch in DataLoader(data, batch_size=5, num_workers=workers,
                                              collate_fn=collate_skipping_bad) for c in batch["caption"]]
        from_b = sum(c.startswith("from B") for c in captions)
        assert (len(captions) - from_b, from_b) == (30, 10)
    assert data.describe_mix(max(workers, 1)) == "A 30 (75.0%), B 10 (25.0%) per rank"


def _recaption(src, dst, prefix: str) -> None:
    import io
    import tarfile

    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for member in tin:
            data = tin.extractfile(member).read()
            if member.name.endswith(".txt"):
                data = f"{prefix} {data.decode()}".encode()
            elif member.name.endswith(".json"):
                data = json.dumps({"caption": f"{prefix} {json.loads(data)['caption']}"}).encode()
            member.size = len(data)
            tout.addfile(member, io.BytesIO(data))


def test_secrets_in_urls_are_masked_and_the_rest_kept():
    assert masked_url("https://user:pw@host:8443/a/{0..3}.tar?X-Amz-Signature=abc") == \
        "https://user:***@host:8443/a/{0..3}.tar?***"
    assert masked_url("s3://bucket/a.tar") == "s3://bucket/a.tar"
    assert masked_url("shards/{00000..00009}.tar") == "shards/{00000..00009}.tar"
    assert masked_url("s3://b/x.tar::https://h/y.tar?token=1") == "s3://b/x.tar::https://h/y.tar?***"


def test_args_yaml_records_a_presigned_url_without_its_signature(tmp_path):
    from common.config_args import flat_settings
    from training.cli import pretrain_config_from_argv

    held_out = tmp_path / "held_out.json"  # a shards run needs held-out pairs, refused at the flag check without
    held_out.write_text('[{"image": "a.png", "caption": "a red cube"}]')
    cfg = pretrain_config_from_argv(TINY_BASE + ["--exp_name", "image_text_itc", "--webdataset", "--data_path",
                                            "https://host/{00000..00002}.tar?X-Amz-Signature=" + SECRET,
                                            "--train_num_samples", "16", "--eval_data_file_path", str(held_out),
                                            "--output_dir", str(tmp_path / "run")])
    recorded = yaml.safe_dump(flat_settings(cfg))
    assert SECRET not in recorded and "https://host/{00000..00002}.tar?***" in recorded


def test_a_missing_storage_client_is_one_sentence_when_the_shards_are_listed(monkeypatch):
    import fsspec

    def missing(protocol, **kw):
        raise ImportError(f"Install s3fs to access {protocol}")

    monkeypatch.setattr(fsspec, "filesystem", missing)
    with pytest.raises(UserError, match=r"read through fsspec and s3fs, which is not installed .*pip install s3fs"):
        expand_shards("s3://bucket/wds/{00000..00002}.tar")  # at start, in the main process, not in a loader worker

"""The project's DALL-E encoder loads OpenAI-style pickles without the dall_e package and without
running pickled code, and yields the package's own token ids."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import dall_e  # noqa: E402 - the reference (README test command installs it); a missing one is a failure, not a skip
import pytest
import torch

from common.errors import UserError
from models.visual_tokenizers import create_visual_tokenizer
from tests.helpers import ROOT

LOAD_WITHOUT_PACKAGE = textwrap.dedent("""
    import sys
    sys.modules["dall_e"] = None  # importing dall_e now fails
    sys.path.insert(0, {root!r})
    import torch
    from models.visual_tokenizers import create_visual_tokenizer
    tok = create_visual_tokenizer("dall-e", {path!r}, 32)
    assert "dall_e" not in [m for m in sys.modules if sys.modules[m] is not None]
    torch.save(tok.get_codebook_indices(torch.load({images!r}, weights_only=True)), {out!r})
""")


@pytest.fixture(scope="module")
def encoder_and_images():
    torch.manual_seed(0)
    encoder = dall_e.encoder.Encoder(n_hid=64, vocab_size=512, n_blk_per_group=1).eval()
    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        expected = encoder(dall_e.map_pixels(images)).argmax(1).flatten(1)
    return encoder, images, expected


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_token_ids_match_the_package_without_importing_it(tmp_path, encoder_and_images, legacy):
    encoder, images, expected = encoder_and_images
    folder = tmp_path / "dall_e"
    folder.mkdir()
    torch.save(encoder, folder / "encoder.pkl", _use_new_zipfile_serialization=not legacy)  # as OpenAI did
    torch.save(images, tmp_path / "images.pt")
    script = LOAD_WITHOUT_PACKAGE.format(root=str(ROOT), path=str(folder), images=str(tmp_path / "images.pt"),
                                         out=str(tmp_path / "ids.pt"))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    got = torch.load(tmp_path / "ids.pt", weights_only=True)
    assert got.shape == (3, 16) and torch.equal(got, expected)
    # the tensors were cached as safetensors and the cache gives the same ids
    assert (folder / "encoder.safetensors").is_file()
    (folder / "encoder.pkl").unlink()
    cached = create_visual_tokenizer("dall-e", folder, 32)
    assert torch.equal(cached.get_codebook_indices(images), expected)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(tmp_path, encoder_and_images):
    encoder = encoder_and_images[0]
    encoder.payload = _Payload(tmp_path / "pwned")  # rides along inside the module's __dict__
    folder = tmp_path / "evil"
    folder.mkdir()
    try:
        torch.save(encoder, folder / "encoder.pkl")
    finally:
        del encoder.payload
    with pytest.raises(UserError, match="refers to posix.system.*refusing to load"):
        create_visual_tokenizer("dall-e", folder, 32)
    assert not (tmp_path / "pwned").exists()


def test_wrong_files_for_the_dall_e_tokenizer(tmp_path, encoder_and_images):
    with pytest.raises(UserError, match="holds neither encoder.pkl"):
        create_visual_tokenizer("dall-e", tmp_path, 32)
    torch.save(torch.nn.Linear(2, 2), tmp_path / "encoder.pkl")
    with pytest.raises(UserError, match="torch.nn.modules.linear.Linear, not dall_e.encoder.Encoder"):
        create_visual_tokenizer("dall-e", tmp_path, 32)
    (tmp_path / "encoder.pkl").write_bytes(b"garbage" * 10)
    with pytest.raises(UserError, match="not a readable DALL-E encoder.pkl"):
        create_visual_tokenizer("dall-e", tmp_path, 32)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_decoder_pickle_renders_what_the_package_renders(tmp_path, legacy):
    """decoder.pkl beside encoder.pkl (as OpenAI ships them) loads without running pickled code,
    and its token -> pixel rendering equals the package's one-hot forward, unmap_pixels(sigmoid(mu))."""
    from models.visual_tokenizers.dall_e_loader import load_dalle_decoder

    torch.manual_seed(0)
    decoder = dall_e.decoder.Decoder(n_init=32, n_hid=64, vocab_size=512, n_blk_per_group=1).eval()
    with torch.no_grad():  # an untrained decoder paints flat grey; spread its output over (0, 1)
        decoder.blocks.output.conv.w.mul_(20)
    ids = torch.randint(0, 512, (2, 16))
    one_hot = torch.nn.functional.one_hot(ids.reshape(2, 4, 4), 512).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        expected = dall_e.unmap_pixels(torch.sigmoid(decoder(one_hot)[:, :3].float()))
    assert 0.05 < expected.std() and expected.min() < 0.5 < expected.max()  # a picture, not a flat field
    assert load_dalle_decoder(tmp_path) is None  # no decoder: pictures fall back, nothing fails
    torch.save(decoder, tmp_path / "decoder.pkl", _use_new_zipfile_serialization=not legacy)
    got = load_dalle_decoder(tmp_path).decode(ids, grid=4)
    assert got.shape == (2, 3, 32, 32)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    (tmp_path / "decoder.pkl").unlink()  # the safetensors cache renders the same
    torch.testing.assert_close(load_dalle_decoder(tmp_path).decode(ids, grid=4), expected, atol=1e-5, rtol=1e-5)


def test_an_encoder_passed_as_the_decoder_is_refused(tmp_path, encoder_and_images):
    from models.visual_tokenizers.dall_e_loader import load_dalle_decoder

    torch.save(encoder_and_images[0], tmp_path / "decoder.pkl")
    with pytest.raises(UserError, match="not dall_e.decoder.Decoder"):
        load_dalle_decoder(tmp_path)


def test_dall_e_tokens_are_drawn_only_with_a_decoder(tmp_path, encoder_and_images):
    from models.visual_tokenizers import token_renderer

    encoder, images, expected = encoder_and_images
    torch.save(encoder, tmp_path / "encoder.pkl")
    tokenizer = create_visual_tokenizer("dall-e", tmp_path, 32)
    assert token_renderer(tokenizer, tmp_path, 32) is None  # the picture is skipped with a note, nothing fails
    torch.save(dall_e.decoder.Decoder(n_init=32, n_hid=64, vocab_size=512, n_blk_per_group=1), tmp_path / "decoder.pkl")
    drawn = token_renderer(tokenizer, tmp_path, 32)(expected)
    assert drawn.shape == (3, 3, 32, 32) and 0 <= drawn.min() and drawn.max() <= 1

"""`--compile`: the compiled blocks give the eager losses (1e-4) over optimizer steps, and keep
their parameter names (checkpoints do not change); the DALL-E tokenizer's encoder is compiled, not
just its wrapper, and gives the eager ids. Slow: compilation takes tens of seconds on a CPU."""
from __future__ import annotations

import pytest
import torch

from models import create_model
from models.modes import ImageMIM, ModeOptions
from training.compilation import compile_modules


def _losses(compiled: bool) -> tuple[list[float], list[str]]:
    torch.manual_seed(0)
    backbone = create_model("vlmo_tiny_patch16", img_size=32, patch_size=8, drop_path_rate=0.0)
    mode = ImageMIM(backbone, ModeOptions(visual_vocab_size=16)).train()
    if compiled:
        compile_modules(backbone.blocks)
    optimizer = torch.optim.AdamW(mode.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(3):
        batch = {"image": torch.randn(4, 3, 32, 32, generator=gen),
                 "bool_masked_pos": torch.rand(4, 16, generator=gen) < 0.4,
                 "visual_token_ids": torch.randint(0, 16, (4, 16), generator=gen)}
        loss = mode(batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, list(mode.state_dict())


@pytest.mark.slow
def test_compiled_steps_give_the_eager_losses_and_names():
    eager, eager_names = _losses(False)
    compiled, compiled_names = _losses(True)
    assert compiled == pytest.approx(eager, abs=1e-4)
    assert compiled_names == eager_names  # no _orig_mod: checkpoints are the same files


@pytest.mark.slow
def test_the_dall_e_encoder_itself_is_compiled_and_gives_the_eager_ids():
    from models.visual_tokenizers import DalleTokenizer
    from models.visual_tokenizers.dall_e import DalleEncoder, DalleEncoderConfig

    torch.manual_seed(0)
    tokenizer = DalleTokenizer(DalleEncoder(DalleEncoderConfig(n_hid=16, n_blk_per_group=1, vocab_size=64)))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    eager = tokenizer.get_codebook_indices(images)
    compile_modules(create_model("vlmo_tiny_patch16", img_size=32, patch_size=8).blocks, tokenizer)
    assert tokenizer.encoder._compiled_call_impl is not None  # what get_codebook_indices calls
    assert torch.equal(tokenizer.get_codebook_indices(images), eager)


@pytest.mark.slow
def test_compiled_mae_steps_give_the_eager_losses():
    """image_mae's visible-only encoder (a per-image relative bias) through the compiled blocks."""
    from custom_datasets.masking import FractionMaskGenerator
    from models.modes import ImageMAE
    from models.modes.image_mae import MAEShape

    def losses(compiled: bool) -> list[float]:
        import random

        torch.manual_seed(0)
        backbone = create_model("vlmo_tiny_patch16", img_size=32, patch_size=8, drop_path_rate=0.0)
        mode = ImageMAE(backbone, ModeOptions(mae=MAEShape(64, 1, 2))).train()
        if compiled:
            compile_modules(backbone.blocks)
        optimizer = torch.optim.AdamW(mode.parameters(), lr=1e-3)
        gen, masker, out = torch.Generator().manual_seed(0), FractionMaskGenerator((4, 4), 0.75), []
        for step in range(3):
            mask = torch.stack([torch.from_numpy(masker(random.Random(step * 4 + i)).reshape(-1)) for i in range(4)])
            loss = mode({"image": torch.randn(4, 3, 32, 32, generator=gen), "bool_masked_pos": mask})["loss"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            out.append(loss.item())
        return out

    assert losses(True) == pytest.approx(losses(False), abs=1e-4)

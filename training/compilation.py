"""`--compile`: torch.compile of each transformer block (and of the DALL-E encoder that makes MIM
targets). Blocks are compiled in place (`nn.Module.compile`), so parameter names, checkpoints,
LoRA, DDP and FSDP see the same modules as without it; the blocks share one compiled graph. The
first steps pay the compilation (tens of seconds on a CPU); the numbers stay the same (a test
compares losses to 1e-4)."""
from __future__ import annotations

from torch import nn

from common.console import say


def compile_modules(blocks: nn.ModuleList, visual_tokenizer: nn.Module | None = None) -> None:
    for block in blocks:
        block.compile()
    compiled = f"{len(blocks)} blocks"
    # the modules get_codebook_indices calls: compiling a wrapper would compile nothing, since only a
    # module's own __call__ is compiled (k-means has no network to compile)
    parts = visual_tokenizer.compiled_parts() if hasattr(visual_tokenizer, "compiled_parts") else []
    for part in parts:
        part.compile()
    if parts:
        compiled += f" and the visual tokenizer's {visual_tokenizer.compiled_parts_name}"
    say(f"--compile: {compiled} compiled with torch.compile (the first steps are slower while it compiles)")

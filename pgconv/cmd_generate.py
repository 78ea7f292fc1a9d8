"""`pgconv generate [CHECKPOINT] --image PATH [--image PATH ...] --prompt TEXT [...]`: stream generated text to stdout.

Without CHECKPOINT it uses the built-in tiny fixture (created on first use in the user cache) and, without --image,
the built-in test image; several --image options are several images in the one prompt (`_prompt_images`).
Thin: load (`pgconv.load`, or layer by layer under --max-memory: `model.streaming`), process (`Processor`),
`generate` with a streaming callback.
"""

from __future__ import annotations

import math
from pathlib import Path

import click

from pgconv.errors import InputError, printable
from pgconv.model.generate import check_length
from pgconv.options import max_memory_option

__all__ = ["generate"]

DTYPES = ("float32", "bfloat16", "float16")


class FiniteFloatRange(click.FloatRange):
    """click.FloatRange that also refuses nan and inf: NaN passes every bound comparison, and a NaN or infinite
    temperature / top-p turns the sampling distribution into NaNs (a torch.multinomial traceback)."""

    def convert(self, value, param, ctx):  # type: ignore[no-untyped-def]
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return rv


def _utf8_prompt(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from pgconv.model.processor import check_utf8

    try:  # before any file is read; the processor refuses it too, for API callers
        check_utf8(value, "the prompt")
    except InputError as e:
        raise click.BadParameter(str(e), ctx, param) from None
    return value


@click.command("generate")
@click.argument("checkpoint", required=False)
@click.option("--image", "images", multiple=True, type=click.Path(path_type=Path, dir_okay=False),
              help="Image file (default: the built-in test image). Repeat it for several images in the one prompt, "
                   "in order: one per <image> marker in --prompt, or all before the prompt when it has none "
                   "(transformers' multi-image layout: one block of image tokens per image).")
@click.option("--prompt", default="caption en", show_default=True, callback=_utf8_prompt,
              help="Text prompt (PaliGemma task prefix). It may place the images itself with <image> markers, "
                   "one per --image, e.g. '<image> left, <image> right: which is larger?'.")
@click.option("--max-new-tokens", default=None, type=click.IntRange(min=1),
              help="Default: the generation config's max_new_tokens / max_length, else 20 (as transformers).")
@click.option("--temperature", default=None, type=FiniteFloatRange(min=0.0),
              help="0 = greedy. Default: the generation config's (greedy unless it sets do_sample).")
@click.option("--top-k", default=None, type=click.IntRange(min=1),
              help="Sample from the k most likely tokens (default when sampling: the generation config's, 50).")
@click.option("--top-p", default=None, type=FiniteFloatRange(min=0.0, max=1.0, min_open=True),
              help="Nucleus sampling mass (default when sampling: the generation config's, 1.0).")
# torch.Generator.manual_seed takes a 64-bit seed (negative ones alias to 2**64 + seed).
@click.option("--seed", default=None, type=click.IntRange(0, 2**64 - 1), help="Seed for sampling.")
@click.option("--dtype", type=click.Choice(DTYPES), default=None, help="Compute dtype (default: as transformers' dtype='auto': config.json's dtype, else the weights').")
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"]))
@click.option("--verbose", is_flag=True, help="After the text, print (to stderr) the CPU kernel each product shape "
              "ran on and how it was chosen (measured, cached, PGCONV_KERNELS).")
@max_memory_option("runs layer by layer: each block's weights are read from the checkpoint (and cast) only while it "
                   "runs")
def generate(checkpoint: str | None, images: tuple[Path, ...], prompt: str, max_new_tokens: int | None,
             temperature: float | None,
             top_k: int | None, top_p: float | None, seed: int | None, dtype: str | None, device: str,
             verbose: bool = False, max_memory: str | None = None) -> None:
    """Generate text for images and a prompt with the PaliGemma CHECKPOINT (directory or hub id; default: the
    built-in tiny random-weight checkpoint, for trying the command).

    EOS ids, pad id, length and sampling defaults and the logits processors (repetition penalty, banned words, ...)
    come from the checkpoint's generation config as transformers' generate() reads them: generation_config.json,
    else config.json's top level."""
    import torch

    from pgconv.converter.fixture import default_checkpoint, default_image
    from pgconv.converter.hub import resolve_source
    from pgconv.converter.load import check_checkpoint, generation_settings
    from pgconv.model.generate import generate as run
    from pgconv.model.processor import Processor

    if temperature is not None and temperature == 0 and (top_k is not None or top_p is not None):  # silently greedy
        raise click.UsageError("--top-k/--top-p sample: give --temperature > 0 (temperature 0 is greedy decoding)")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: CUDA is not available (torch.cuda.is_available() is false)")
    if checkpoint is None:
        source = default_checkpoint()
    else:
        source, _ = resolve_source(checkpoint)  # a hub id becomes its local snapshot (for the tokenizer files)
    # Config, processor and inputs first (headers only): bad tokenizer files, images, prompts or lengths are
    # refused before the weights are read.
    ckpt, cfg, _ = check_checkpoint(*resolve_source(source))
    settings = generation_settings(ckpt, cfg)
    processor = Processor.from_pretrained(source if source.is_dir() else source.parent, config=cfg)
    inputs = processor([_prompt_images(images, prompt, default_image())], prompt)
    n_prompt = inputs["input_ids"].shape[1]
    temperature, top_k, top_p = _sampling(settings, temperature, top_k, top_p)
    settings.check_supported(greedy=temperature == 0)
    if max_new_tokens is None:
        max_new_tokens = settings.new_tokens(n_prompt, cfg.text.max_position_embeddings)
        if max_new_tokens < 1:
            raise InputError(f"{settings.source}: max_length={settings.max_length} leaves no room after the "
                             f"{n_prompt}-token prompt; pass --max-new-tokens")
    check_length(n_prompt, max_new_tokens, cfg.text.max_position_embeddings)
    from pgconv.model.budget import resolve_budget
    from pgconv.model.streaming import load_within

    model = load_within(source, getattr(torch, dtype) if dtype else None, device, budget=resolve_budget(max_memory))
    weight = model.text.embed.weight
    stream = processor.stream_decoder()

    def on_token(tokens: torch.Tensor) -> None:
        # A crafted tokenizer (a byte-fallback <0x1B> piece) could write ESC sequences to the terminal.
        click.echo(printable(stream(int(tokens[0])), keep="\n\t"), nl=False)

    run(
        model, inputs["input_ids"].to(device), inputs["pixel_values"].to(device=device, dtype=weight.dtype),
        inputs["token_type_ids"].to(device), inputs["attention_mask"].to(device),
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
        on_token=on_token, settings=settings,
    )
    click.echo()
    if verbose:
        from pgconv.model import cpu_gemv, cpu_kernels

        for choice in cpu_kernels.choices():
            click.echo(f"kernel: {cpu_kernels.describe(choice)}", err=True)
        gemv = (f"built for {cpu_gemv.isa()}" if cpu_gemv.available()
                else f"not a candidate ({cpu_gemv.unavailable_reason()})")
        click.echo(f"kernels: pgconv's one-row kernel (gemv) {gemv}", err=True)


def _sampling(settings, temperature: float | None, top_k: int | None,
              top_p: float | None) -> tuple[float, int | None, float | None]:
    """(temperature, top_k, top_p) as transformers' generate() would sample: without --temperature, the generation
    config decides (greedy unless do_sample); when sampling, unset top-k / top-p take the generation config's
    values (transformers' defaults: top_k 50, top_p 1.0)."""
    if temperature is None:
        if not settings.do_sample:
            if top_k is not None or top_p is not None:
                raise click.UsageError("--top-k/--top-p sample: give --temperature > 0 (the generation config is "
                                       "greedy: do_sample is not set)")
            return 0.0, None, None
        temperature = settings.temperature
    if temperature == 0:
        return 0.0, None, None
    return (temperature, settings.top_k if top_k is None else top_k, settings.top_p if top_p is None else top_p)


def _prompt_images(images: tuple[Path, ...], prompt: str, default: Path) -> list[Path]:
    """The prompt's image list: the --image files in order, or the built-in image for each <image> marker (one
    when there is none). A prompt with markers takes exactly one --image per marker."""
    from pgconv.model.prompts import image_slots

    markers = image_slots(prompt)
    if not images:
        return [default] * max(markers, 1)
    if markers and markers != len(images):
        raise InputError(f"--prompt holds {markers} <image> marker(s) but {len(images)} --image file(s) were given "
                         "(one per marker, in order)")
    return list(images)

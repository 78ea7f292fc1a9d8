"""`pgconv golden CKPT -o DIR`: the reference's activations at every probe, for a port in any language (thin wrapper
over `pgconv.parity.golden.golden`)."""

from __future__ import annotations

from pathlib import Path

import click

from pgconv.errors import printable
from pgconv.options import max_memory_option

__all__ = ["golden"]


@click.command("golden")
@click.argument("checkpoint", required=False)
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Directory to write (probes.json, case<k>/inputs.safetensors, case<k>/activations.safetensors).")
@click.option("--image", "images", multiple=True, type=click.Path(path_type=Path, dir_okay=False),
              help="Input image (repeatable; paired with --prompt as in pgconv verify). Default: the built-in one.")
@click.option("--prompt", "prompts", multiple=True, help="Prompt text (repeatable). Default: 'caption en'.")
@click.option("--dtype", default="float32", show_default=True,
              type=click.Choice(["float32", "bfloat16", "float16"]), help="Dtype the reference runs in.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--probes", type=click.Choice(["all", "coarse"]), default="all", show_default=True,
              help="coarse: block-level probes only; all: also every norm, attention and MLP inside a block.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=10, show_default=True,
              help="Greedy tokens recorded (with each step's top-k logits).")
@click.option("--force", is_flag=True, help="Replace a non-empty output directory.")
@max_memory_option("is loaded through accelerate's big-model inference (CPU/disk offload), same activations")
def golden(checkpoint: str | None, out_dir: Path, images: tuple[Path, ...], prompts: tuple[str, ...], dtype: str,
           device: str, probes: str, max_new_tokens: int, force: bool, max_memory: str | None = None) -> None:
    """Write transformers' (eager) activations on CHECKPOINT (default: the built-in tiny checkpoint) at every
    probe, with the exact inputs and a documented schema: run your port on the inputs, dump what it computes under
    the schema's names, and check it with `pgconv compare DIR DUMP`."""
    from pgconv.parity.golden import golden as run

    doc = run(checkpoint, out_dir, images=images, prompts=prompts, dtype=dtype, device=device, probes=probes,
              max_new_tokens=max_new_tokens, force=force, max_memory=max_memory)
    for case in doc["cases"]:
        click.echo(printable(f"case {case['case']}: {' + '.join(Path(i).name for i in case['images'])} "
                             f"{case['prompt']!r}: {case['sequence_length']} tokens, greedy "
                             f"{case['generation']['text']!r}, inputs sha256 {case['inputs_sha256'][:16]}..."))
    click.echo(f"{len(doc['probes'])} probes ({doc['dtype']}) written to {out_dir}/ (schema: probes.json)")

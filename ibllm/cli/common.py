"""What the ``chat``, ``generate`` and ``serve`` verbs share: the ``ibllm.load`` options, the input options,
the sampling options (option groups: dataclasses whose fields are top-level options), and one-line errors."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

from ibllm.api import MEDIA, InferenceModel, load

# Errors a command reports as one line (bad files, inputs or options) instead of a traceback.
RECOVERABLE = (ValueError, OSError, RuntimeError, KeyError)
# The spellings the load options had before they were typed: ``--llm`` for ``--llama``.
LOAD_ALIASES = {"--llm": "--llama"}


@dataclass
class ModelOptions:
    """Model.

    Args:
        adapter: our checkpoint / .safetensors export, an official 7B.pth or 7B-pretrained.pth, or a merged
            export folder
        llama: base LLaMA: Meta/HF folder, GGUF file, smollm2-135m-instruct (default: recorded in the adapter)
        tokenizer: tokenizer file (default: the base model's)
        imagebind: ImageBind weights (imagebind_huge.pth / imagebind_w3D.pth layout)
        imagebind_preset: skip the encoder preset guess (huge, huge_w3d, demo, tiny)
        cache: visual cache index (cache-enhanced inputs)
        device: where to run (cpu, cuda, cuda:1)
        dtype: float32 (default), bfloat16, float16
        max_seq_len: context length (default: the adapter's)
        merge: fold LoRA into the base weights (faster decoding)
        check_base: fail on a base-model mismatch (false, or --no-check-base: warn instead)
    """

    adapter: str | None = None
    llama: str | None = None
    tokenizer: str | None = None
    imagebind: str | None = None
    imagebind_preset: str | None = None
    cache: str | None = None
    device: str = "cpu"
    dtype: str | None = None
    max_seq_len: int | None = None
    merge: bool = False
    check_base: bool = True


@dataclass
class InputOptions:
    """Inputs.

    Args:
        image: image input file
        video: video input file
        audio: audio input file
        point: point input file
        depth: depth input file
        thermal: thermal input file
        imu: imu input file
        text: text input (a string)
        weights: comma-separated modality weights, in the order the input options were given
    """

    image: str | None = None
    video: str | None = None
    audio: str | None = None
    point: str | None = None
    depth: str | None = None
    thermal: str | None = None
    imu: str | None = None
    text: str | None = None
    weights: str | None = None


@dataclass
class SamplingOptions:
    """Sampling.

    Args:
        max_gen_len: most tokens per answer
        temperature: sampling temperature (0: greedy)
        top_p: nucleus sampling mass
        seed: sampling seed (default: unseeded)
    """

    max_gen_len: int = 256
    temperature: float = 0.1
    top_p: float = 0.75
    seed: int | None = None


def chosen_inputs(inputs: InputOptions, argv: Sequence[str] = ()) -> dict[str, tuple[str, float]]:
    """``{modality: (item, weight)}`` of the given inputs. ``--weights`` follow the order the input options
    appear in ``argv``; inputs set only in a config file follow, in :data:`MEDIA` order."""
    order: list[str] = []
    for token in argv:
        name = token[2:].split("=", 1)[0] if token.startswith("--") else None
        if name in MEDIA and getattr(inputs, name) is not None and name not in order:
            order.append(name)
    order += [m for m in MEDIA if getattr(inputs, m) is not None and m not in order]
    weights = [1.0] * len(order)
    if inputs.weights:
        try:
            weights = [float(w) for w in str(inputs.weights).split(",")]
        except ValueError:
            raise ValueError(f"--weights {inputs.weights!r}: expected comma-separated numbers") from None
        if len(weights) != len(order):
            raise ValueError(f"--weights has {len(weights)} values for {len(order)} inputs ({', '.join(order)})")
    return {name: (getattr(inputs, name), w) for name, w in zip(order, weights)}


def load_model(options: ModelOptions) -> InferenceModel:
    """``ibllm.load`` with the model options."""
    return load(adapter=options.adapter, llama=options.llama, tokenizer=options.tokenizer,
                imagebind=options.imagebind, cache=options.cache, device=options.device, dtype=options.dtype,
                imagebind_preset=options.imagebind_preset, max_seq_len=options.max_seq_len,
                check_base=options.check_base, merge=options.merge)


def one_line(err: BaseException) -> str:
    """An exception as one line."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text


def fail(err: BaseException) -> None:
    """Print ``error: ...`` (one line) to stderr and exit with status 1."""
    print(f"error: {one_line(err)}", file=sys.stderr)
    raise SystemExit(1)

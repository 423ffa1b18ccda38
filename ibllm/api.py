"""The inference API: ``ibllm.load(...)`` -> :class:`InferenceModel` (encode, generate, stream, chat) and
:class:`ChatSession` (multi-turn conversations). The ``chat``, ``generate`` and ``serve`` commands and the
HTTP server are built on it.

Everything a user would otherwise restate is read from the files (:func:`ibllm.build.build_from_adapter`):
the LLaMA shape from the base model, the stage and adapter dimensions from the adapter's tensors, the
ImageBind preset and branches from the encoder file. Adapters may be any file
:func:`ibllm.checkpoints.adapters.read_adapter` reads, including a merged export folder.

Inputs (:func:`normalise_inputs`, the one parser of modality inputs) map a modality (image, video, audio,
text, point, depth, thermal, imu) to a file, a list of files (one per batch row), a tensor batch,
``(file, weight)``, ``[(file, weight), ...]`` or ``([files], weight)``; the weight defaults to 1.0.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ibllm import cache as cache_module
from ibllm.build import build_from_adapter, build_merged, load_tokenizer_for
from ibllm.checkpoints.adapters import Adapter, read_adapter
from ibllm.checkpoints.io import CheckpointError
from ibllm.generation import generate_tokens, stream_text, stream_tokens
from ibllm.models.ibllm import MODALITY_BRANCH
from ibllm.models.merge import merge_lora, place_visual_bases
from ibllm.processing.samples import conversation_prompt_ids
from ibllm.processing.templates import format_prompt
from ibllm.tokenizer import load_tokenizer

PathLike = str | Path
# Modalities an input may name (the keys of :data:`ibllm.models.ibllm.MODALITY_BRANCH`).
MEDIA = ("image", "video", "audio", "point", "depth", "thermal", "imu", "text")


class InferenceModel:
    """A loaded ImageBind-LLM for inference: encoding, batched generation, streaming and chat.

    Attributes: ``model`` (:class:`~ibllm.models.ibllm.ImageBindLLM`, eval mode), ``tokenizer``, ``cache``
    (a visual cache with ``enhance`` or None), ``info`` (what was loaded from where).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, cache: Any = None, info: dict[str, Any] | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.cache = cache
        self.info = info or {}

    @property
    def device(self) -> torch.device:
        return self.model.prefix_query.weight.device

    @property
    def max_seq_len(self) -> int:
        """The context length (prompt + generated tokens)."""
        return self.model.cfg.max_seq_len

    @property
    def modalities(self) -> list[str]:
        """ImageBind branches the loaded encoder has (empty without an encoder)."""
        enc = self.model.image_bind
        return list(getattr(enc, "modalities", []) or []) if enc is not None else []

    # ---- encoding ------------------------------------------------------------------------------
    def encode(self, inputs: Mapping[str, Any], cache: Any = "default") -> Tensor:
        """Mixed ImageBind embedding ``[B, C]`` of ``inputs``, cache-enhanced when a cache is set.

        Each modality's embedding is L2-normalised and the modalities are mixed with their weights
        (divided by their sum).

        ``inputs`` maps a modality (image, video, audio, text, point, depth, thermal, imu) to a file, a
        list of files (one per batch row), a tensor batch, ``(file, weight)``, ``[(file, weight), ...]`` or
        ``([files], weight)``; the weight defaults to 1.0. ``cache=None`` disables the model's cache.
        """
        normalised = normalise_inputs(inputs)
        if self.model.image_bind is None:
            raise ValueError("this model was loaded without an ImageBind encoder (pass imagebind=FILE to load)")
        cache = self.cache if cache == "default" else cache
        return self.model.encode(normalised, cache=cache)

    def visual(self, inputs: Mapping[str, Any] | None, cache: Any = "default") -> Tensor | None:
        """Bound visual token ``[B, 1, D]`` of ``inputs`` (None when there are no inputs)."""
        if not inputs:
            return None
        with torch.inference_mode():
            return self.model.bind(self.encode(inputs, cache))

    # ---- prompts -------------------------------------------------------------------------------
    def prompt_ids(self, prompts: Sequence[str | Sequence[int]], template: bool = True) -> list[list[int]]:
        """Token ids (BOS first) of ``prompts``: strings are wrapped in the Alpaca instruction template
        (``template=True``) and encoded; id lists pass through. Raises when a prompt fills the context."""
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                ids = self.tokenizer.encode(format_prompt(p) if template else p, bos=True, eos=False)
            else:
                ids = [int(t) for t in p]
            self.check_length(ids, f"prompt {i}" if len(prompts) > 1 else "the prompt")
            out.append(ids)
        return out

    def check_length(self, ids: Sequence[int], what: str = "the prompt") -> None:
        """One clear error when ``ids`` leave no room to generate within the context."""
        if len(ids) >= self.max_seq_len:
            raise ValueError(f"{what} is {len(ids)} tokens long; the model's context is {self.max_seq_len} tokens "
                             "(prompt + answer)")

    # ---- generation ----------------------------------------------------------------------------
    def _generator(self, seed: int | None) -> torch.Generator | None:
        return torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None

    @staticmethod
    def _rows(visual: Tensor | None, n: int) -> Tensor | None:
        """``visual`` for ``n`` prompts: one row is shared by all; otherwise one row per prompt."""
        if visual is not None and visual.shape[0] == 1 and n > 1:
            visual = visual.expand(n, -1, -1)
        if visual is not None and visual.shape[0] != n:
            raise ValueError(f"{visual.shape[0]} input rows for {n} prompts; give one input per "
                             "prompt or a single input shared by all prompts")
        return visual

    def stream(self, prompt_ids: Sequence[Sequence[int]], visual: Tensor | None = None, max_gen_len: int = 256,
               temperature: float = 0.1, top_p: float = 0.75, seed: int | None = None) -> Iterator[Tensor]:
        """Raw token stream: one ``[B]`` tensor per step (-1 where a row is not generating), see
        :func:`ibllm.generation.stream_tokens`."""
        return stream_tokens(self.model, prompt_ids, self._rows(visual, len(prompt_ids)), max_gen_len, temperature,
                             top_p, self.tokenizer.eos_id, self._generator(seed))

    def stream_text(self, prompt_ids: Sequence[int], visual: Tensor | None = None, max_gen_len: int = 256,
                    temperature: float = 0.1, top_p: float = 0.75, seed: int | None = None) -> Iterator[str]:
        """Yield the decoded text of one prompt's answer piece by piece as tokens are produced
        (:func:`ibllm.generation.stream_text`)."""
        return stream_text(self.model, self.tokenizer, prompt_ids, self._rows(visual, 1), max_gen_len, temperature,
                           top_p, self._generator(seed))

    def generate(self, inputs: Mapping[str, Any] | None, prompts: Sequence[str | Sequence[int]] | str,
                 max_gen_len: int = 256, temperature: float = 0.1, top_p: float = 0.75, cache: Any = "default",
                 template: bool = True, seed: int | None = None) -> list[str]:
        """Answers (stripped strings) for a batch of ``prompts`` conditioned on ``inputs``.

        ``inputs`` as in :meth:`encode` (None / {} = text only); a single input row is shared by every
        prompt. ``template=False`` sends prompt strings as they are (already formatted).
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        ids = self.prompt_ids(prompts, template)
        visual = self._rows(self.visual(inputs, cache), len(ids))
        out = generate_tokens(self.model, ids, visual, max_gen_len, temperature, top_p, self.tokenizer.eos_id,
                              self._generator(seed))
        return [self.tokenizer.decode(o).strip() for o in out]

    def chat(self, message: str, history: Sequence[tuple[str, str]] = (), inputs: Mapping[str, Any] | None = None,
             **kwargs: Any) -> str:
        """One chat turn: the answer to ``message`` after ``history`` (``[(user, assistant), ...]``) in the
        project's multi-turn template (:class:`ChatSession`). For an interactive session with streaming and
        changing inputs use :meth:`session`."""
        session = self.session(inputs)
        session.history = list(history)
        return session.send(message, **kwargs)

    def session(self, inputs: Mapping[str, Any] | None = None, cache: Any = "default") -> ChatSession:
        """A :class:`ChatSession` on this model."""
        return ChatSession(self, inputs, cache=cache)

    def merge(self) -> "InferenceModel":
        """Fold LoRA into the base weights in place (faster decoding; same outputs up to rounding)."""
        if self.model.stage == "finetune":
            merge_lora(self.model)
        return self


class ChatSession:
    """A conversation with an :class:`InferenceModel`: history, inputs and streaming.

    The chat uses the multi-turn template stage 2 trains with
    (:func:`~ibllm.processing.samples.conversation_prompt_ids`); the current inputs are mixed into one
    visual token that conditions the whole conversation, recomputed only when they change. When the
    history no longer fits the context, the oldest turns are dropped.

    ``inputs`` maps a modality to ``(item, weight)`` (one item per modality; see
    :meth:`InferenceModel.encode` for the accepted forms).
    """

    def __init__(self, model: Any, inputs: Mapping[str, Any] | None = None, cache: Any = "default") -> None:
        self.model = model
        self.cache = cache
        self.history: list[tuple[str, str]] = []
        self.inputs: dict[str, tuple[Any, float]] = {}
        self._visual = None
        if inputs:
            self.set_inputs(inputs)

    # ---- inputs --------------------------------------------------------------------------------
    def set_inputs(self, inputs: Mapping[str, Any]) -> None:
        """Replace all inputs; on any error the previous inputs stay in place."""
        normalised = normalise_inputs(inputs)
        visual = self.model.visual(normalised, self.cache) if normalised else None
        self.inputs = {m: (items[0] if isinstance(items, list) and len(items) == 1 else items, w)
                       for m, (items, w) in normalised.items()}
        self._visual = visual

    def set_input(self, modality: str, item: Any, weight: float | None = None) -> None:
        """Set (or replace) one modality's input; the others keep theirs."""
        new = dict(self.inputs)
        old_weight = new.get(modality, (None, 1.0))[1]
        new[modality] = (item, float(weight) if weight is not None else old_weight)
        self.set_inputs(new)

    def drop_input(self, modality: str) -> None:
        """Remove one modality's input (error when there is none)."""
        if modality not in self.inputs:
            raise ValueError(f"no {modality} input to drop (inputs: {', '.join(self.inputs) or 'none'})")
        new = dict(self.inputs)
        del new[modality]
        self.set_inputs(new)

    def reset(self) -> None:
        """Forget the conversation; inputs are kept."""
        self.history = []

    def describe_inputs(self) -> str:
        """``image=a.png (1.0), audio=b.wav (0.6)`` or ``none``."""
        return ", ".join(f"{m}={item} ({w:g})" for m, (item, w) in self.inputs.items()) or "none"

    # ---- turns ---------------------------------------------------------------------------------
    def prompt_ids(self, message: str) -> tuple[list[int], int]:
        """Ids for the next answer and how many of the oldest turns had to be dropped to fit the context."""
        tok = self.model.tokenizer
        limit = self.model.max_seq_len - 1
        for dropped in range(len(self.history) + 1):
            ids = conversation_prompt_ids(tok, self.history[dropped:], message)
            if len(ids) < limit:
                return ids, dropped
        self.model.check_length(ids, "the message")
        return ids, len(self.history)

    def send(self, message: str, on_text: Callable[[str], None] | None = None, max_gen_len: int = 256,
             temperature: float = 0.1, top_p: float = 0.75, seed: int | None = None) -> str:
        """Answer ``message``; ``on_text`` receives the answer piece by piece as it is generated.

        The turn is added to the history only when generation completes.
        """
        if not message.strip():
            raise ValueError("empty message")
        ids, dropped = self.prompt_ids(message)
        if dropped:
            self.history = self.history[dropped:]
        pieces = []
        for piece in self.model.stream_text(ids, self._visual, max_gen_len=max_gen_len, temperature=temperature,
                                            top_p=top_p, seed=seed):
            pieces.append(piece)
            if on_text is not None:
                on_text(piece)
        reply = "".join(pieces).strip()
        self.history.append((message, reply))
        return reply


def normalise_inputs(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """Accepted input forms -> ``{modality: (items, weight)}`` as :meth:`ImageBindLLM.encode` wants.

    Checks the modality names and that the weights sum to a positive number (one clear error otherwise).
    """
    out: dict[str, Any] = {}
    for modality, value in inputs.items():
        if modality not in MODALITY_BRANCH:
            raise ValueError(f"unknown modality {modality!r}; expected one of {', '.join(sorted(MODALITY_BRANCH))}")
        items, weight = _split_weight(modality, value)
        out[modality] = (items, weight)
    if out:
        total = sum(w for _, w in out.values())
        if not total > 1e-3:
            raise ValueError(f"modality weights {[w for _, w in out.values()]} sum to {total:g}; they must sum to a "
                             "positive number")
    return out


def _split_weight(modality: str, value: Any) -> tuple[Any, float]:
    def is_weight(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    if isinstance(value, Tensor):
        return value, 1.0
    if isinstance(value, (str, Path, bytes)):
        return [value], 1.0
    if isinstance(value, tuple) and len(value) == 2 and is_weight(value[1]):
        items, weight = value
        if isinstance(items, Tensor):
            return items, float(weight)
        return ([items] if isinstance(items, (str, Path, bytes)) else list(items)), float(weight)
    if isinstance(value, (list, tuple)):
        pairs = [v for v in value if isinstance(v, tuple) and len(v) == 2 and is_weight(v[1])]
        if pairs and len(pairs) == len(value):
            weights = {float(w) for _, w in pairs}
            if len(weights) > 1:
                raise ValueError(f"{modality}: one weight per modality (got {sorted(weights)})")
            return [item for item, _ in pairs], weights.pop()
        if pairs:
            raise ValueError(f"{modality}: mix of weighted and unweighted items")
        return list(value), 1.0
    raise ValueError(f"{modality}: unsupported input {type(value).__name__}; give a file, a list of files or "
                     "(file, weight)")


def open_cache(cache: Any) -> Any:
    """A visual cache object (anything with ``enhance``) or a path opened with :mod:`ibllm.cache`."""
    if cache is None or hasattr(cache, "enhance"):
        return cache
    for name in ("load_cache", "open_cache", "load"):
        fn = getattr(cache_module, name, None)
        if callable(fn):
            return fn(cache)
    for cls in vars(cache_module).values():
        if isinstance(cls, type) and hasattr(cls, "enhance") and hasattr(cls, "load"):
            return cls.load(cache)
    raise ValueError(f"cannot open visual cache {cache}: ibllm.cache has no loader")


def load(adapter: PathLike | None = None, llama: str | PathLike | None = None, tokenizer: PathLike | None = None,
         imagebind: PathLike | None = None, cache: Any = None, device: str | torch.device = "cpu",
         dtype: str | torch.dtype | None = None, imagebind_preset: str | None = None,
         modalities: Sequence[str] | None = None, max_seq_len: int | None = None,
         check_base: bool = True, merge: bool = False) -> InferenceModel:
    """Load an ImageBind-LLM for inference, inferring every dimension from the files.

    Args:
        adapter: our Lightning checkpoint, our ``.safetensors`` export, an official ``7B.pth`` /
            ``7B-pretrained.pth`` file, or a merged export folder. None: the plain base model.
        llama: base model (Meta / HF folder, GGUF file, ``smollm2-135m-instruct`` or a preset name);
            default: the one recorded in the adapter (not needed for merged folders).
        tokenizer: tokenizer file; default: the one with ``llama`` (or recorded in the adapter).
        imagebind: encoder weights (``imagebind_huge.pth`` / ``imagebind_w3D.pth`` layout or safetensors);
            default: the one recorded in the adapter. None and nothing recorded: no encoder (text only).
        cache: a visual cache (object with ``enhance``) or a cache path for :mod:`ibllm.cache`.
        device, dtype: where and in which dtype to run (dtype default float32).
        imagebind_preset: skip the encoder preset guess (with no ``imagebind`` file: random towers).
        modalities: encoder branches to build (default: every branch the file holds).
        max_seq_len: context length (default: the adapter's training value, else 512).
        check_base: raise :class:`BaseModelMismatch` when the base does not match the adapter's record
            (False: warn instead).
        merge: fold LoRA into the base weights after loading (faster decoding).
    """
    ad = read_adapter(adapter) if adapter is not None else None
    if ad is not None and ad.kind == "merged":
        return _load_merged(ad, tokenizer, imagebind, cache, device, dtype, imagebind_preset, modalities, max_seq_len)
    model, info, llm = build_from_adapter(ad, llama, imagebind, imagebind_preset, modalities, max_seq_len, check_base)
    meta = ad.meta if ad else {}
    tok_source = tokenizer or (meta.get("tokenizer") if llama is None else None)
    try:
        tok = load_tokenizer_for(llm, tok_source)
    except (ValueError, CheckpointError, FileNotFoundError) as e:
        raise ValueError(f"no tokenizer for {llm}: {e}") from None
    model = _place(model, device, dtype)
    result = InferenceModel(model, tok, open_cache(cache), info)
    return result.merge() if merge else result


def _place(model: nn.Module, device: str | torch.device, dtype: str | torch.dtype | None) -> nn.Module:
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model = model.to(device=torch.device(device))
    if dtype is not None and dtype != torch.float32:
        model = model.to(dtype=dtype)
    return model.eval()


def _load_merged(ad: Adapter, tokenizer: PathLike | None, imagebind: PathLike | None, cache: Any,
                 device: str | torch.device, dtype: Any, imagebind_preset: str | None,
                 modalities: Sequence[str] | None, max_seq_len: int | None) -> InferenceModel:
    """A merged export (:func:`ibllm.build.build_merged`) with its tokenizer, placed on ``device``."""
    model, info = build_merged(ad, imagebind, imagebind_preset, modalities, max_seq_len)
    d = Path(ad.source)
    tok_source = tokenizer or ad.meta.get("tokenizer_file")
    if tok_source and not Path(tok_source).is_absolute() and (d / tok_source).exists():
        tok_source = d / tok_source
    if not tok_source:
        raise ValueError(f"merged export {d} names no tokenizer: pass tokenizer=PATH")
    tok = load_tokenizer(tok_source)
    model = _place(model, device, dtype)
    place_visual_bases(model)  # not submodules, so model.to() did not move them
    return InferenceModel(model, tok, open_cache(cache), info)

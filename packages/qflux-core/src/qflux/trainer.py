"""The ``Trainer`` a plugin registers: one model family's training recipe, as an object whose methods the core
calls (the pattern of simonw/llm's ``register_models``).

A plugin subclasses ``Trainer``, sets ``info`` (a ``TrainerInfo``), implements the stages its model supports
and hands an instance to ``register`` in ``qflux_register_trainers``. A stage it does not implement is a
capability it lacks: the core finds that out before any work (``require``) and says so in one line, exit
code 2, instead of failing mid-run. Heavy imports (torch, diffusers) belong inside the method bodies, so
that registering a trainer stays cheap (``qflux plugins list``).

The stages, in the order of one ``qflux train`` run (``qflux.run.train``; the tested order with the hooks is
in docs/plugins.md, "Call order")::

    check(config)                              preflight, before anything is read or written
    shift_rule(model), scheduler_config(model) once, at the start, for ``timestep_sampling: resolution_shift``
    load_encoders(model)                       only when something must be encoded or sampled
    encode(encoders, samples, model, ...)      per chunk of samples missing from the embedding cache
    encode_request(encoders, request, model)   each validation image's prompts and controls (optional stage)
    decoder(encoders, tiling)                  what sampling keeps of the encoders (the VAE); the rest is freed
    load_transformer(model)                    then quantized (Quantizer), then the adapter is attached
    predict(transformer, batch, noisy, model)  every step and for the validation loss
    sample(bundle, request, encoded)           validation images and ``qflux sample``

Encoders never sit beside the transformer: a trainer that implements ``encode_request`` has every validation
request (and ``qflux sample``'s) encoded before the transformer loads; the text encoders are then freed and
``sample`` gets the encoding back (``encoded``) with ``bundle.encoders`` = ``decoder(...)``. A trainer without
``encode_request`` keeps the older contract: ``sample`` encodes the raw request with the whole encoders.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from qflux.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL.Image import Image
    from pydantic import BaseModel

    from qflux.config.schema import ModelConfig, QfluxConfig
    from qflux.types import Batch, EditSample, EncodedSample, ModelBundle, NoisyInput, SampleRequest, TrainerInfo

# The stages a trainer may lack, and what the user was doing that needs it (for the one-line refusal).
CAPABILITIES = {
    "load_transformer": "load its transformer",
    "load_encoders": "load its encoders",
    "encode": "encode training samples",
    "predict": "run a training step",
    "sample": "generate images (validation samples, qflux sample)",
}


class Unsupported(UserError):
    """The selected trainer does not implement a stage the command needs (exit code 2)."""


class Trainer:
    """Base class of registered trainers. Override the stages your model supports; see the module docstring.

    ``Options``: a pydantic model of the trainer's own config keys (``model.options``), validated before the
    run with the same "did you mean" errors as the core's keys; None: the trainer takes no options.
    """

    info: TrainerInfo
    Options: ClassVar[type[BaseModel] | None] = None

    def __init__(self, info: TrainerInfo | None = None) -> None:
        if info is not None:
            self.info = info
        if getattr(self, "info", None) is None:
            raise TypeError(f"{type(self).__name__}: a Trainer needs info (a TrainerInfo)")

    @property
    def name(self) -> str:
        return self.info.name

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.info.name!r}>"

    # ------------------------------------------------------------------ capabilities

    def implements(self, stage: str) -> bool:
        """Whether this trainer overrides ``stage`` (one of ``CAPABILITIES``)."""
        return getattr(type(self), stage) is not getattr(Trainer, stage)

    def require(self, *stages: str, why: str) -> None:
        """``Unsupported`` naming the first of ``stages`` this trainer lacks and ``why`` it is needed."""
        for stage in stages:
            if not self.implements(stage):
                raise Unsupported(f"trainer '{self.name}' cannot {CAPABILITIES[stage]} (its plugin does not "
                                  f"implement Trainer.{stage}), which {why} needs")

    def options(self, model: ModelConfig) -> BaseModel | None:
        """``model.options`` validated by ``Options`` (None when the trainer declares none)."""
        if self.Options is None:
            return None
        return self.Options.model_validate(model.options)

    # ------------------------------------------------------------------ stages

    def check(self, config: QfluxConfig) -> None:
        """Refuse what this trainer cannot train (raise ``UserError``), before any data or weights are read."""

    def load_transformer(self, model: ModelConfig) -> torch.nn.Module:
        """The denoising transformer from ``model.pretrained`` in ``model.dtype``: frozen, on CPU, not quantized;
        raise ``UserError`` for a bad folder."""
        raise self._unsupported("load_transformer")

    def load_encoders(self, model: ModelConfig) -> Any:
        """Everything ``encode`` and ``sample`` need besides the transformer (VAE, text encoders, tokenizers,
        processor), frozen, on CPU. An object with ``to(device)`` (returning the moved object) is moved to the
        training device for encoding and back to the CPU before the transformer loads."""
        raise self._unsupported("load_encoders")

    def encode(self, encoders: Any, samples: list[EditSample], model: ModelConfig,
               empty_prompt: bool) -> list[EncodedSample]:
        """One ``EncodedSample`` per sample, in order, tensors on CPU: normalised packed latents of target and
        controls, prompt embeddings, the token-space edit mask, and (``empty_prompt``: caption dropout is on)
        the encoding of the empty prompt."""
        raise self._unsupported("encode")

    def scheduler_config(self, model: ModelConfig) -> dict[str, Any] | None:
        """The model's ``scheduler/scheduler_config.json`` as a dict (``FlowMatchEulerDiscreteScheduler`` keys),
        read for ``train.timestep_sampling: resolution_shift``. None: the core reads a folder's file, else
        diffusers' defaults."""
        return None

    def shift_rule(self, model: ModelConfig) -> Any | None:
        """The timestep shift of ``train.timestep_sampling: resolution_shift``, for a model whose rule is not
        its scheduler config's ``calculate_shift`` (FLUX.2's empirical mu): an object with
        ``apply(sigmas, num_tokens) -> sigmas`` and ``describe() -> str``. None (the default): the resolution
        shift of the model's scheduler config (``scheduler_config``), as FLUX.1 and Qwen-Image use."""
        return None

    def predict(self, transformer: torch.nn.Module, batch: Batch, noisy: NoisyInput,
                model: ModelConfig) -> torch.Tensor:
        """The predicted velocity for the target tokens only, [B, N, C], from the noisy target tokens, the clean
        control tokens and the prompt."""
        raise self._unsupported("predict")

    def encode_request(self, encoders: Any, request: SampleRequest, model: ModelConfig) -> Any:
        """The encoder half of ``sample``, run before the transformer is loaded: everything ``request`` needs
        from the text encoders and the VAE encoder (prompt and negative-prompt embeddings, control latents), as
        an object of the trainer's own whose tensors are on CPU; ``sample`` takes it back as ``encoded``.
        Optional: a trainer without it gets the whole encoders in ``sample`` and the raw request."""
        raise Unsupported(f"trainer '{self.name}' cannot encode a sample request ahead of sampling (its plugin "
                          f"does not implement Trainer.encode_request)")

    def decoder(self, encoders: Any, tiling: bool) -> Any:
        """What ``sample`` needs of ``encoders`` once every request is encoded (``encode_request``): the VAE
        decoder and the scheduler config, never the text encoders, so that they can be freed before the
        transformer loads; ``sample`` gets it as ``bundle.encoders``. ``tiling`` (``validation.vae_tiling``):
        the VAE decodes in tiles and slices where it can. Default: ``encoders`` itself, with
        ``enable_tiling``/``enable_slicing`` called on its ``vae`` when asked (``vae_tiling``)."""
        if tiling:
            vae_tiling(getattr(encoders, "vae", None))
        return encoders

    def sample(self, bundle: ModelBundle, request: SampleRequest, encoded: Any = None) -> Image:
        """One image from the trainer's diffusers pipeline with the current transformer; the pipeline uses a
        scheduler instance of its own, never the training one. ``encoded``: what ``encode_request`` returned
        for ``request`` (then ``bundle.encoders`` is what ``decoder`` returned); None: encode ``request`` here
        with ``bundle.encoders`` (a trainer without ``encode_request`` is only ever called so)."""
        raise self._unsupported("sample")

    def _unsupported(self, stage: str) -> Unsupported:
        return Unsupported(f"trainer '{self.name}' cannot {CAPABILITIES[stage]} (its plugin does not implement "
                           f"Trainer.{stage})")


def vae_tiling(vae: Any) -> bool:
    """Turn on tiled and sliced decoding of a diffusers VAE (``enable_tiling`` / ``enable_slicing``) where the
    model has them; returns whether tiling was turned on (False: ``vae`` is None or cannot tile)."""
    tiled = False
    for name in ("enable_tiling", "enable_slicing"):
        method = getattr(vae, name, None)
        if callable(method):
            try:
                method()
            except (NotImplementedError, ValueError):  # a VAE class that declares but cannot do it
                continue
            tiled = tiled or name == "enable_tiling"
    return tiled

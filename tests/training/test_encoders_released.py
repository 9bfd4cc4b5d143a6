"""Encoders never beside the transformer (issue 19): a run with validation images encodes the validation prompts
and controls before the transformer loads (``Trainer.encode_request``), keeps only ``Trainer.decoder``'s part of
the encoders (the VAE) and never loads the encoders again; ``qflux sample`` does the same (encode, free, load,
denoise, decode). Every trainer, each image the same as the one sampled from the raw request with the whole
encoders (what validation did before)."""

from __future__ import annotations

import dataclasses
import gc
import json
import weakref
from typing import Any

import numpy as np
import pytest
from PIL import Image

from qflux.config import load_config
from qflux.plugins import build_registry
from qflux.testing import single_torch_thread, tiny_config, wrap_trainer, write_config

TRAINERS = ["kontext", "qwen-edit", "qwen-edit-plus", "qwen-edit-2511", "qwen-image-2.1", "flux2-dev", "flux2-klein"]
STAGES = ("load_encoders", "encode_request", "decoder", "load_transformer", "sample")


class OrderSpy:
    """Records the order of the stages; checks that the text encoders are freed before the transformer loads and
    that the first image sampled from an encoding equals the one from the raw request with ``reference`` (the
    whole encoders, loaded before the run outside the spied stages)."""

    def __init__(self, reference: Any) -> None:
        self.calls: list[str] = []
        self.reference = reference
        self.text_encoders: list[weakref.ref] = []
        self.alive_at_transformer_load: list[bool] = []
        self.decoders_without_text_encoder: list[bool] = []
        self.same_as_raw: list[bool] = []

    def wrap(self, registry: Any, name: str) -> Any:
        return wrap_trainer(registry, name, **{stage: getattr(self, stage) for stage in STAGES})

    def load_encoders(self, inner, model):
        self.calls.append("load_encoders")
        encoders = inner(model)
        self.text_encoders.append(weakref.ref(encoders.text_encoder))
        return encoders

    def encode_request(self, inner, encoders, request, model):
        self.calls.append("encode_request")
        return inner(encoders, request, model)

    def decoder(self, inner, encoders, tiling):
        self.calls.append("decoder")
        decoder = inner(encoders, tiling)
        self.decoders_without_text_encoder.append(getattr(decoder, "text_encoder", None) is None)
        return decoder

    def load_transformer(self, inner, model):
        self.calls.append("load_transformer")
        gc.collect()
        self.alive_at_transformer_load.append(any(ref() is not None for ref in self.text_encoders))
        return inner(model)

    def sample(self, inner, bundle, request, encoded=None):
        self.calls.append("sample" if encoded is None else "sample(encoded)")
        image = inner(bundle, request, encoded=encoded)
        if encoded is not None and not self.same_as_raw:  # the first image: the raw request, whole encoders
            raw = inner(dataclasses.replace(bundle, encoders=self.reference), request)
            self.same_as_raw.append(np.array_equal(np.asarray(image), np.asarray(raw)))
        return image

    def assert_encoders_never_beside_the_transformer(self) -> None:
        first = self.calls.index("load_transformer")
        assert "load_encoders" not in self.calls[first:], self.calls
        assert self.calls[:first].count("load_encoders") <= 1, self.calls
        assert "encode_request" in self.calls[:first] and "decoder" in self.calls[:first], self.calls
        assert "encode_request" not in self.calls[first:], self.calls
        assert self.alive_at_transformer_load == [False] * len(self.alive_at_transformer_load), \
            "a text encoder was still referenced when the transformer loaded"
        assert self.decoders_without_text_encoder and all(self.decoders_without_text_encoder)
        samples = [c for c in self.calls if c.startswith("sample")]
        assert samples and set(samples) == {"sample(encoded)"}, self.calls
        assert self.same_as_raw == [True], "the image from the encoding differs from the raw request's"


def resolution(name: str) -> int:
    return 64 if name.startswith("flux2") else 32  # FLUX.2 references: at least 64 px


@pytest.fixture
def no_plots(monkeypatch):
    """loss.png / fidelity.png (matplotlib, seconds a run) are beside the point here."""
    import qflux.training.metrics

    monkeypatch.setattr(qflux.training.metrics, "plot_loss", lambda *a, **k: None)
    monkeypatch.setattr(qflux.training.metrics, "plot_fidelity", lambda *a, **k: None)


@pytest.mark.parametrize("name", TRAINERS)
def test_a_run_with_validation_never_loads_the_encoders_after_the_transformer(tmp_path, name, no_plots):
    """One step, validation every step (images at step 0 and 1, 2 sampling steps). kontext encodes its dataset in
    the run (one load of the encoders for the dataset and the validation request); for the others the cache is
    complete beforehand (``qflux cache``), the case that loaded the encoders at the first validation image,
    beside the transformer, before this change: now they load for the validation request, before it."""
    from qflux.run.cache import build_cache
    from qflux.run.train import train

    config = load_config(write_config(tmp_path / "c.yaml", tiny_config(
        tmp_path, name,
        data={"resolution": resolution(name), "num_samples": 3, "holdout": 1},
        train={"max_steps": 1, "batch_size": 2, "save_every": 0},
        validation={"every": 1, "steps": 2, "from_holdout": 1},
    )))
    registry = build_registry()
    cached = name != "kontext"
    with single_torch_thread():
        if cached:
            assert build_cache(config, registry).encoded == 3
        spy = OrderSpy(registry.trainers[name].load_encoders(config.model))
        spy.wrap(registry, name)
        result = train(config, registry=registry)
    assert result.steps == 1
    spy.assert_encoders_never_beside_the_transformer()
    if cached:  # nothing to encode but the validation request
        assert spy.calls[:4] == ["load_encoders", "encode_request", "decoder", "load_transformer"]
    assert spy.calls.count("sample(encoded)") == 2  # steps 0 and 1, one case each
    run = tmp_path / "run"
    assert (run / "samples" / "step-000000.png").is_file() and (run / "samples" / "step-000001.png").is_file()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_fidelity" in r] == [0, 1]
    if name == "kontext":
        legacy_run_renders_the_same(tmp_path, config, rows)


def legacy_run_renders_the_same(tmp_path, config, rows) -> None:
    """The same run (the cache now complete) through the path of a trainer without ``encode_request``, the core's
    flow before this change (the whole encoders loaded for sampling, the raw request sampled): the same grids and
    validation figures."""
    from qflux.run.train import train
    from qflux.trainer import Trainer
    from qflux_kontext.plugin import KontextTrainer

    class Legacy(KontextTrainer):
        encode_request = Trainer.encode_request  # not implemented: the base class's
        decoder = Trainer.decoder

    legacy = config.model_copy(update={"output": config.output.model_copy(update={"dir": str(tmp_path / "legacy")})})
    registry = build_registry()
    registry.trainers["kontext"] = Legacy()
    calls = []
    wrap_trainer(registry, "kontext", load_encoders=lambda inner, m: calls.append("load_encoders") or inner(m),
                 load_transformer=lambda inner, m: calls.append("load_transformer") or inner(m))
    with single_torch_thread():
        train(legacy, registry=registry)
    # the cache is complete (the first run filled it): the old flow loaded the encoders at the first validation
    # image, after the transformer, and kept both
    assert calls == ["load_transformer", "load_encoders"]
    for step in (0, 1):
        new, old = (np.asarray(Image.open(tmp_path / run / "samples" / f"step-{step:06d}.png"))
                    for run in ("run", "legacy"))
        assert np.array_equal(new, old), f"the validation grid of step {step} differs from the legacy path's"
    legacy_rows = [json.loads(line) for line in (tmp_path / "legacy" / "metrics.jsonl").read_text().splitlines()]
    figures = [{k: v for k, v in r.items() if k.startswith("val_")} for r in rows]
    assert figures == [{k: v for k, v in r.items() if k.startswith("val_")} for r in legacy_rows]


def test_qflux_sample_encodes_frees_then_loads_the_transformer(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import qflux.plugins
    from qflux.cli.main import app

    config_path = write_config(tmp_path / "c.yaml", tiny_config(tmp_path))
    registry = build_registry()
    monkeypatch.setattr(qflux.plugins, "build_registry", lambda *a, **k: registry)
    control = tmp_path / "in.png"
    Image.new("RGB", (48, 32), (220, 20, 20)).save(control)
    with single_torch_thread():
        spy = OrderSpy(registry.trainers["kontext"].load_encoders(load_config(config_path).model))
        spy.wrap(registry, "kontext")
        result = CliRunner().invoke(app, ["sample", "--config", str(config_path), "--prompt", "make it blue",
                                          "--image", str(control), "--out", str(tmp_path / "out.png"), "--steps", "2",
                                          "--true-cfg", "2", "--negative-prompt", "red"])
    assert result.exit_code == 0, result.output[-2000:]
    assert spy.calls == ["load_encoders", "encode_request", "decoder", "load_transformer", "sample(encoded)"]
    spy.assert_encoders_never_beside_the_transformer()
    assert Image.open(tmp_path / "out.png").mode == "RGB"


def test_vae_tiling_is_turned_on_when_asked() -> None:
    """``validation.vae_tiling``: ``Trainer.decoder(encoders, tiling=True)`` turns on diffusers' tiled and sliced
    decoding of the VAE it keeps (the core's default where the VAE has them; nothing for one that has not)."""
    from qflux.config.schema import ModelConfig
    from qflux.trainer import Trainer, vae_tiling

    trainer = build_registry().trainers["kontext"]
    encoders = trainer.load_encoders(ModelConfig(pretrained="builtin:tiny", dtype="float32"))
    assert not encoders.vae.use_tiling
    plain = trainer.decoder(encoders, False)
    assert plain.text_encoder is None and plain.text_encoder_2 is None and not plain.vae.use_tiling
    tiled = trainer.decoder(encoders, True)
    assert tiled.vae is encoders.vae and tiled.vae.use_tiling and tiled.vae.use_slicing
    assert not vae_tiling(None) and not vae_tiling(object())
    holder = type("Encoders", (), {"vae": None})()
    assert Trainer.decoder(trainer, holder, True) is holder

"""The core's ``lokr`` and ``loha`` adapters (peft LoKr / LoHa, LyCORIS export) on the tiny Kontext and Qwen trainers.

Per (adapter, trainer), one real run of 3 steps and its resume from step 2 (``adapter_runs``):

- the state dict holds every targeted Linear layer's factors, the zero-initialised factor has moved, and it
  round-trips (``state_dict`` -> ``load_state`` -> ``state_dict`` is bitwise the same); the checkpoint holds it;
- the resumed run is bitwise the uninterrupted one (losses, final tensors, export);
- the export's weight change, computed from the file alone by ComfyUI's rule (written out below from
  ``comfy/weight_adapter/lokr.py`` / ``loha.py`` and ``comfy/lora.py`` ``load_lora``), equals peft's merged weight
  minus the base weight of the trained model (merged in float64) within 1e-5 relative, and every key is one ComfyUI maps for the
  family (``lycoris_<diffusers module with "." -> "_">``, ``model_lora_keys_unet`` for Flux and QwenImage);
- ``qflux sample``'s path (``Adapter.load_file`` on a bare transformer) merges that same change into the base,
  from the export and from the checkpoint (to float32 rounding of the weight), and leaves every other weight
  alone.

The LoKr runs use rank 8 on the attention projections (128 x 128: both Kronecker factors full, the path where
ComfyUI ignores alpha and the export bakes the scale) and on ``net.0.proj`` (512 x 128: w2 decomposed, the path
where ComfyUI applies alpha / rank), alpha 3 (a scale that is not 1). Without training, the other LoKr shapes
(decompose_both, decompose_factor, lycoris init) are checked the same way.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from adapter_runs import (
    TRAINERS,
    assert_bitwise_resume,
    assert_merged,
    base,
    merged_deltas,
    relative,
    train_and_resume,
    trained_deltas,
)
from safetensors import safe_open
from safetensors.torch import load_file

from qflux.adapters.lycoris import LohaOptions, LokrOptions
from qflux.errors import ConfigError, UserError
from qflux.plugins import build_registry

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "net.0.proj"]
SETTINGS = {
    "lokr": {"adapter": "lokr", "adapter_options": {"rank": 8, "alpha": 3.0, "targets": TARGETS}},
    "loha": {"adapter": "loha", "adapter_options": {"rank": 4, "alpha": 3.0, "targets": TARGETS}},
}
FACTORS = {"lokr": {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"},
           "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}}
ZERO_AT_INIT = {"lokr": ("lokr_w1", "lokr_w1_a"), "loha": ("hada_w2_b",)}  # peft's default init


@pytest.fixture(scope="module", params=[(k, t) for k in SETTINGS for t in TRAINERS], ids=lambda p: f"{p[0]}-{p[1]}")
def run(request, tmp_path_factory, cache):
    kind, trainer = request.param
    return train_and_resume(tmp_path_factory.mktemp(f"{kind}-{trainer}"), trainer, SETTINGS[kind], cache)


def kind_of(run) -> str:
    return run.config.model.adapter


def targeted_linears(transformer: torch.nn.Module) -> set[str]:
    return {n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)
            and any(n == t or n.endswith("." + t) for t in TARGETS)}


# --------------------------------------------------------------------------- ComfyUI's rule, written out


def comfyui_weight_changes(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per key prefix: the weight change ComfyUI applies at strength 1 from a LyCORIS file's tensors.

    ``load_lora``: alpha = ``{x}.alpha``.item() when present, else None. LoKr (``calculate_weight``): w1 = lokr_w1,
    else lokr_w1_a @ lokr_w1_b with dim = w1_b's rows; w2 likewise (dim then w2_b's rows); scale alpha / dim when
    alpha is not None and some factor was decomposed, else 1.0; change = scale * kron(w1, w2). LoHa: scale
    alpha / hada_w1_b's rows (1.0 without alpha); change = scale * (w1_a @ w1_b) * (w2_a @ w2_b)."""
    prefixes = {k.rsplit(".", 1)[0] for k in tensors}
    out = {}
    for x in prefixes:
        t = {k.rsplit(".", 1)[1]: v.float() for k, v in tensors.items() if k.rsplit(".", 1)[0] == x}
        alpha = t["alpha"].item() if "alpha" in t else None
        if "hada_w1_a" in t:
            scale = alpha / t["hada_w1_b"].shape[0] if alpha is not None else 1.0
            out[x] = scale * (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
            continue
        dim = None
        if "lokr_w1" in t:
            w1 = t["lokr_w1"]
        else:
            dim, w1 = t["lokr_w1_b"].shape[0], t["lokr_w1_a"] @ t["lokr_w1_b"]
        if "lokr_w2" in t:
            w2 = t["lokr_w2"]
        else:
            dim, w2 = t["lokr_w2_b"].shape[0], t["lokr_w2_a"] @ t["lokr_w2_b"]
        scale = alpha / dim if alpha is not None and dim is not None else 1.0
        out[x] = scale * torch.kron(w1, w2)
    return out


def lycoris_name(module: str) -> str:
    return "lycoris_" + module.replace(".", "_")


def comfyui_lycoris_keys(transformer: torch.nn.Module) -> set[str]:
    """The ``lycoris_*`` prefixes ComfyUI maps for the family: one per diffusers weight name it maps as
    ``transformer.<name>`` (Flux, FLUX.2 (a ``Flux`` subclass): ``flux_to_diffusers``; QwenImage: its own module
    names), reusing the LoRA test's reproduction of those tables."""
    path = Path(__file__).resolve().parents[1] / "training" / "test_lora_export.py"
    spec = importlib.util.spec_from_file_location("lora_export_tables", path)
    tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tables)
    config = transformer.config
    if type(transformer).__name__.startswith("Flux"):
        prefixes = tables.comfyui_flux_lora_prefixes(config.num_layers, config.num_single_layers)
    else:
        prefixes = tables.comfyui_qwen_image_lora_prefixes(config.num_layers)
    return {lycoris_name(p.removeprefix("transformer.")) for p in prefixes}


# --------------------------------------------------------------------------- state, checkpoint, resume


def test_the_state_dict_is_the_adapter_and_round_trips(run):
    kind, state = kind_of(run), run.full.lora
    fresh = base(run.trainer)
    modules = targeted_linears(fresh)
    assert state and {k.rsplit(".", 1)[0] for k in state} == modules
    assert {k.rsplit(".", 1)[1] for k in state} <= FACTORS[kind]
    zero_at_init = [k for k in state if k.rsplit(".", 1)[1] in ZERO_AT_INIT[kind]]
    unmoved = [k for k in zero_at_init if not state[k].abs().max() > 0]
    assert len(zero_at_init) == len(modules)
    # training moved them all but the last Qwen block's text MLP, whose output the model discards (no gradient)
    assert unmoved in ([], ["transformer_blocks.3.txt_mlp.net.0.proj." + ZERO_AT_INIT[kind][0]]), unmoved
    assert all(v.dtype == torch.float32 for v in state.values())
    params = run.adapter.attach(fresh, run.options)
    assert len(params) == len(state) and all(p.requires_grad for p in params)
    run.adapter.load_state(fresh, state)
    again = run.adapter.state_dict(fresh)
    assert again.keys() == state.keys() and all(torch.equal(again[k], state[k]) for k in state)
    with pytest.raises(UserError, match="does not fit"):
        run.adapter.load_state(fresh, {k: v for k, v in list(state.items())[1:]})
    saved = load_file(str(run.checkpoint))  # the last checkpoint holds exactly the final state
    assert saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in state)
    with safe_open(str(run.checkpoint), "pt") as f:
        header = f.metadata()
    assert header["qflux.adapter"] == kind and header["qflux.adapter_layout"] == "peft"
    assert json.loads(header["qflux.adapter_options"])["alpha"] == 3.0


def test_resume_is_bitwise_the_uninterrupted_run(run):
    assert_bitwise_resume(run)


# --------------------------------------------------------------------------- export


def test_the_exported_file_gives_the_trained_weight_change_by_comfyuis_rule(run):
    kind = kind_of(run)
    tensors = load_file(str(run.export))
    trained = trained_deltas(run)
    assert set(trained) == targeted_linears(base(run.trainer))
    names = {lycoris_name(m): m for m in trained}
    prefixes = {k.rsplit(".", 1)[0] for k in tensors}
    assert prefixes == set(names)  # one lycoris_ prefix per trained module, nothing else
    assert {k.rsplit(".", 1)[1] for k in tensors} <= FACTORS[kind] | {"alpha"}
    assert all(f"{p}.alpha" in tensors and tensors[f"{p}.alpha"].dim() == 0 for p in prefixes)
    unmapped = sorted(prefixes - comfyui_lycoris_keys(base(run.trainer)))
    assert not unmapped, f"ComfyUI maps no key for {unmapped[:3]}"
    comfy = comfyui_weight_changes(tensors)
    worst = max(relative(comfy[p], trained[m]) for p, m in names.items())
    assert worst <= 1e-5, f"ComfyUI's weight change differs from training: relative error {worst:.3g}"
    if kind == "lokr":  # both of ComfyUI's LoKr cases are in the file: full factors, and a decomposed w2
        assert any(f"{p}.lokr_w2" in tensors for p in prefixes) and any(f"{p}.lokr_w2_a" in tensors for p in prefixes)
    # the rule's alpha matters: read with scale 1.0 everywhere, the decomposed modules come out alpha / rank off
    decomposed = [p for p in prefixes if (f"{p}.lokr_w2_a" in tensors or f"{p}.hada_w1_a" in tensors)
                  and trained[names[p]].abs().max() > 0]
    unscaled = comfyui_weight_changes({k: v for k, v in tensors.items() if not k.endswith(".alpha")})
    assert decomposed and all(relative(unscaled[p], trained[names[p]]) > 0.2 for p in decomposed)


def test_the_export_header_names_the_kind_and_carries_the_runs_entries(run):
    with safe_open(str(run.export), "pt") as f:
        header = f.metadata()
    assert header["qflux.adapter"] == kind_of(run) and header["qflux.adapter_layout"] == "lycoris"
    assert json.loads(header["qflux.adapter_options"]) == run.options.model_dump(mode="json")
    assert "qflux.training_sizes" in header and "qflux.adapter_state_sha256" in header
    assert run.export.name == run.adapter.file_name


def test_sample_merges_the_trained_weight_change_into_the_base(run):
    """``qflux sample --lora FILE`` applies the file with ``Adapter.load_file`` to the bare transformer: the export
    and the last checkpoint both add the trained change to the targeted weights and touch nothing else."""
    trained = trained_deltas(run)
    pristine = base(run.trainer)
    before = {n: p.detach().clone() for n, p in pristine.named_parameters()}
    for path in (run.export, run.checkpoint):
        merged = base(run.trainer)
        run.adapter.load_file(merged, path)
        after = dict(merged.named_parameters())
        assert after.keys() == before.keys()  # merged: no adapter layers left on the model
        for m, delta in trained.items():
            assert_merged(after[f"{m}.weight"].detach(), before[f"{m}.weight"], delta, f"{path.name} {m}")
        touched = {f"{m}.weight" for m in trained}
        assert all(torch.equal(after[n], before[n]) for n in before if n not in touched)


# --------------------------------------------------------------------------- LoKr shapes without training


def randomised(trainer: str, kind: str, options) -> torch.nn.Module:
    from qflux.adapters.lycoris_files import adapter_parameters, attach

    transformer = base(trainer)
    attach(transformer, kind, options)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in adapter_parameters(transformer, kind).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return transformer


@pytest.mark.parametrize("options, factors", [
    (LokrOptions(rank=2, alpha=5.0, decompose_both=True), {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"}),
    (LokrOptions(rank=4, alpha=5.0, decompose_factor=4), {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
    (LokrOptions(rank=16, alpha=5.0, init="lycoris"), {"lokr_w1", "lokr_w2"}),
    (LohaOptions(rank=3, alpha=0.5), {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}),
], ids=["decompose_both", "decompose_factor", "full", "loha"])
def test_every_factor_layout_exports_the_peft_weight_change(options, factors, tmp_path):
    from qflux.adapters.lycoris_files import export

    kind = "lokr" if isinstance(options, LokrOptions) else "loha"
    transformer = randomised("kontext", kind, options)
    live = merged_deltas(transformer)
    path = export(transformer, kind, options, tmp_path / "x.safetensors")
    tensors = load_file(str(path))
    assert {k.rsplit(".", 1)[1] for k in tensors} == factors | {"alpha"}
    comfy = comfyui_weight_changes(tensors)
    worst = max(relative(comfy[lycoris_name(m)], d) for m, d in live.items())
    assert worst <= 1e-5, f"relative error {worst:.3g}"
    if factors == {"lokr_w1", "lokr_w2"}:  # ComfyUI applies 1.0 here: the export bakes peft's scale, alpha = rank
        assert all(v.item() == 16.0 for k, v in tensors.items() if k.endswith(".alpha"))


@pytest.mark.parametrize("trainer", ["kontext", "qwen-edit", "qwen-edit-plus", "qwen-edit-2511", "flux2-klein",
                                     "flux2-dev"])
def test_every_exported_key_is_one_comfyui_maps(trainer, tmp_path):
    """Every Linear layer targeted (FLUX.2: the default targets; its other layers are not in the LoRA test's table)."""
    from qflux.adapters.lycoris_files import attach, export

    transformer = base(trainer)
    linear = sorted(n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear))
    options = LokrOptions(rank=2, targets=linear) if not trainer.startswith("flux2") else LokrOptions(rank=2)
    attach(transformer, "lokr", options)
    prefixes = {k.rsplit(".", 1)[0] for k in load_file(str(export(transformer, "lokr", options, tmp_path / "x")))}
    if not trainer.startswith("flux2"):
        assert prefixes == {lycoris_name(n) for n in linear}
    unmapped = sorted(prefixes - comfyui_lycoris_keys(transformer))
    assert not unmapped, f"ComfyUI would not load {len(unmapped)} modules, e.g. {unmapped[:3]}"


# --------------------------------------------------------------------------- files that do not fit


def test_a_file_that_does_not_fit_is_refused_and_nothing_is_merged(tmp_path):
    from safetensors.torch import save_file

    from qflux.adapters.lora_files import attach_lora, export_lora
    from qflux.adapters.lycoris_files import export
    from qflux.config.schema import LoraConfig

    registry = build_registry()
    lokr, loha = registry.adapter("lokr"), registry.adapter("loha")
    lokr_file = export(randomised("kontext", "lokr", LokrOptions(rank=4)), "lokr", LokrOptions(rank=4),
                       tmp_path / "lokr.safetensors")
    loha_file = export(randomised("kontext", "loha", LohaOptions(rank=4)), "loha", LohaOptions(rank=4),
                       tmp_path / "loha.safetensors")
    lora_model = base("kontext")
    attach_lora(lora_model, LoraConfig(rank=4))
    lora_file = export_lora(lora_model, "diffusers.FluxKontextPipeline", LoraConfig(rank=4), tmp_path / "lora")
    tensors = load_file(str(lokr_file))
    save_file({**tensors, "lycoris_no_such_module.lokr_w1": torch.zeros(2, 2)}, str(tmp_path / "alien.safetensors"))
    save_file({**tensors, "lycoris_x_embedder.diff": torch.zeros(2, 2)}, str(tmp_path / "stray.safetensors"))
    cases = [
        (lokr, loha_file, "it is a LoHa file (qflux.adapter: loha), not a LoKr one: set model.adapter: loha"),
        (loha, lokr_file, "set model.adapter: lokr"),
        (lokr, lora_file, "it holds LoRA tensors (e.g. transformer."),
        (lokr, tmp_path / "alien.safetensors", "1 of its modules do not exist (e.g. lycoris_no_such_module)"),
        (lokr, tmp_path / "stray.safetensors", f"1 of its {len(tensors) + 1} tensors are no LoKr factor of a Linear"),
        (lokr, tmp_path / "missing.safetensors", "LoRA file not found"),
    ]
    for adapter, path, message in cases:
        transformer = base("kontext")
        before = {n: p.detach().clone() for n, p in transformer.named_parameters()}
        with pytest.raises(UserError) as err:
            adapter.load_file(transformer, path)
        assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
        assert all(torch.equal(p, before[n]) for n, p in transformer.named_parameters())


# --------------------------------------------------------------------------- options and config errors


def check(tmp_path: Path, **model):
    from qflux.config import load_config
    from qflux.run.preflight import check_config
    from qflux.testing import tiny_config, write_config

    path = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, model=model))
    check_config(load_config(path), build_registry())


@pytest.mark.parametrize("model, message", [
    ({"adapter": "lokr", "adapter_options": {"decompose_factor": 0}},
     "'model.adapter_options.decompose_factor': -1 (split near the square root) or a factor >= 1, not 0 (got 0)"),
    ({"adapter": "lokr", "adapter_options": {"rank": 0}}, "'model.adapter_options.rank': Input should be greater"),
    ({"adapter": "lokr", "adapter_options": {"init": "pissa"}}, "'model.adapter_options.init': Input should be"),
    ({"adapter": "loha", "adapter_options": {"rank_dropout": 1.0}}, "'model.adapter_options.rank_dropout'"),
    ({"adapter": "loha", "adapter_options": {"decompose_both": True}},
     "unknown key 'model.adapter_options.decompose_both' (the loha adapter takes: rank, alpha, targets"),
    ({"adapter": "lokr", "adapter_options": {"rnak": 4}}, "did you mean 'model.adapter_options.rank'?"),
    ({"adapter": "lokr", "quantize": "nf4"}, "model.adapter: lokr needs a full-precision transformer, but "
                                            "model.quantize is nf4"),
    ({"lora": {"dora": "sometimes"}}, "model.lora.dora"),
    ({"lora": {"dora": True}, "quantize": "fp8"}, "model.lora.dora does not work with model.quantize: fp8"),
    ({"lora": {"dora": True}, "quantize": "int8"}, "model.lora.dora does not work with model.quantize: int8"),
], ids=["factor", "rank", "init", "dropout", "loha-key", "did-you-mean", "quantize", "dora-bool", "dora-fp8",
        "dora-int8"])
def test_a_bad_option_is_a_config_error_before_any_work(model, message, tmp_path):
    with pytest.raises(ConfigError) as err:
        check(tmp_path, **model)
    assert message in str(err.value) and err.value.exit_code == 2, str(err.value)


def test_a_misspelt_target_is_a_config_error_with_a_did_you_mean():
    from qflux.adapters.lycoris_files import attach

    with pytest.raises(ConfigError, match=r"model.adapter_options.targets: no module named 'to_qq' .*did you mean "
                                          r"'to_q'\?"):
        attach(base("kontext"), "lokr", LokrOptions(targets=["to_qq"]))
    with pytest.raises(ConfigError, match=r"attn.to_out is a ModuleList, not a Linear layer"):
        attach(base("kontext"), "loha", LohaOptions(targets=["attn.to_out"]))


def test_the_cli_says_a_bad_option_on_one_line_and_exits_2(run_qflux, tmp_path):
    from qflux.testing import tiny_config, write_config

    path = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, model={
        "adapter": "lokr", "adapter_options": {"decompose_factor": -2}}))
    result = run_qflux("config", "check", path, plugins="kontext")
    assert result.returncode == 2 and "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0] == "error: invalid config" and len(lines) == 2, lines  # as every other config mistake
    assert "'model.adapter_options.decompose_factor'" in lines[1] and "not -2" in lines[1]


def test_plugins_list_shows_the_adapters_with_their_descriptions():
    from typer.testing import CliRunner

    from qflux.cli.main import app

    registry = build_registry()
    assert {"lora", "lokr", "loha"} <= set(registry.adapters)
    assert all(registry.provider[f"adapter:{n}"] == "qflux-core" for n in ("lora", "lokr", "loha"))
    listing = CliRunner().invoke(app, ["plugins", "list"], env={"COLUMNS": "250"})
    assert listing.exit_code == 0, listing.output
    for name in ("lokr", "loha", "lora"):
        line = next(line for line in listing.output.splitlines() if f" {name} " in line and "qflux-core" in line)
        assert registry.adapters[name].description[:40] in line

"""export: a base shard + overlay -> a Hugging Face checkpoint that stock transformers loads with
the same logits as the layer-streamed runner; the tied form stores windows once and re-ties."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import mlpfuse
from mlpfuse.stages import compress, export, shard
from mlpfuse.stages.model.families import family_for
from mlpfuse.stages.model.hf import TIES_FILE
from mlpfuse.stages.model.overlay import Overlay, load_overrides, save_overlay
from mlpfuse.stages.model.runner import LayerStreamedModel
from mlpfuse.stages.model.shards import layer_file, load_shard_meta
from tests.conftest import TINY_CONFIGS

FAMILIES = ("llama", "gpt2", "mixtral", "qwen2_moe", "gemma3_text", "opt", "qwen3_moe")
N_LAYERS = 4
SKIP, TIE = 1, [2, 3]  # base layer 1 dropped; base layers 2 and 3 share one FF set
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
IDS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(3))


def _make(model_type: str, path: Path) -> Path:
    """A 4-layer tiny random checkpoint (gemma3: mixed sliding/full attention layers)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    kw = dict(TINY_CONFIGS[model_type])
    kw["n_layer" if model_type == "gpt2" else "num_hidden_layers"] = N_LAYERS
    if model_type == "gemma3_text":
        kw["layer_types"] = LAYER_TYPES
    torch.manual_seed(0)
    auto = AutoModel if model_type == "bert" else AutoModelForCausalLM
    auto.from_config(AutoConfig.for_model(model_type, **kw)).save_pretrained(path)
    return path


def _overlay(shard_dir: Path, out: Path, fractions: dict[int, float]) -> Path:
    """Prune every FF block of each kept layer to ``fractions[layer]`` of its neurons (the first
    ones), skip layer SKIP, and give the TIE layers the first one's pruned blocks (tied)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(shard_dir)
    family = family_for(cfg)

    def base_state(i: int) -> dict[str, torch.Tensor]:
        return load_file(str(shard_dir / layer_file(i)))

    blocks = {}
    for i in (0, TIE[0]):
        sd = base_state(i)
        blocks[i] = {}
        for ref in family.ff_blocks(cfg, sd):
            ff = family.read_ff(cfg, sd, ref)
            k = max(1, int(ff.intermediate_size * fractions[i]))
            blocks[i][ref] = ff.select(torch.arange(k))
    for i in TIE[1:]:
        blocks[i] = blocks[TIE[0]]
    save_overlay(out, Overlay(blocks=blocks, skip={SKIP}, tied=[list(TIE)]), family, cfg, base_state)
    (out / "method.json").write_text(json.dumps({"method": "prune-first", "fractions": fractions}))
    return out


def _stored_numel(model_dir: Path) -> int:
    n = 0
    for f in model_dir.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                shape = h.get_slice(k).get_shape()
                n += int(torch.tensor(shape).prod().item()) if shape else 1
    return n


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Per family: shard, a uniform overlay (stock + tied exports) and a non-uniform one (stock,
    sharded into several files)."""
    out = {}
    for mt in FAMILIES:
        root = tmp_path_factory.mktemp(f"export-{mt}")
        sh = root / "shard"
        shard.run(shard.ShardConfig(model=str(_make(mt, root / "ckpt"))), {}, sh)
        uni = _overlay(sh, root / "ov-uniform", {0: 0.5, TIE[0]: 0.5})
        mixed = _overlay(sh, root / "ov-mixed", {0: 0.5, TIE[0]: 0.75})
        r_stock = export.run(export.ExportConfig(), {"shard": sh, "overlay": uni}, root / "stock")
        r_tied = export.run(export.ExportConfig(tied=True), {"shard": sh, "overlay": uni}, root / "tied")
        r_mixed = export.run(export.ExportConfig(max_shard_size="40KB", card={"method": "hand-made"}),
                             {"shard": sh, "overlay": mixed}, root / "mixed")
        r_wide = export.run(export.ExportConfig(), {"shard": sh, "overlay": _overlay(
            sh, root / "ov-wide", {0: 0.75, TIE[0]: 0.75})}, root / "wide")
        out[mt] = {"shard": sh, "uniform": uni, "mixed": mixed, "stock": r_stock, "tied": r_tied,
                   "mixed_export": r_mixed, "wide_export": r_wide}
    return out


def _streamed(shard_dir: Path, overlay: Path, monkeypatch: pytest.MonkeyPatch) -> torch.Tensor:
    """The reference: the layer-streamed runner on base shard + overlay."""
    from transformers.pytorch_utils import Conv1D

    # The runner swaps a layer's tensors into modules built for the base sizes; GPT-2's Conv1D
    # reshapes by its constructor-time ``nf``, so take the width from the weight actually loaded.
    def conv1d_forward(self: Conv1D, x: torch.Tensor) -> torch.Tensor:
        size_out = x.size()[:-1] + (self.weight.shape[1],)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)

    with monkeypatch.context() as m:
        m.setattr(Conv1D, "forward", conv1d_forward)
        lm = LayerStreamedModel(shard_dir, overrides=load_overrides(overlay))
        if lm.family.moe is not None:
            # transformers' default grouped_mm expert kernel needs 16-byte aligned expert sizes;
            # the overlays here are not (the export pads them), so the reference runs eager.
            lm.model.set_experts_implementation("eager")
        return lm.logits(IDS)


def _stock_logits(path: str) -> tuple[torch.Tensor, torch.nn.Module]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return model(IDS, use_cache=False).logits, model


@pytest.mark.parametrize("mt", FAMILIES)
def test_stock_export_matches_streamed(mt: str, exports: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    e = exports[mt]
    res = e["stock"]
    got, model = _stock_logits(res["path"])
    ref = _streamed(e["shard"], e["uniform"], monkeypatch)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= 1e-5
    assert res["num_hidden_layers"] == N_LAYERS - 1 == model.config.num_hidden_layers
    assert res["params"] == model.num_parameters()
    assert res["padded_params"] == 0
    assert res["ff_params"] < res["base_ff_params"]
    layer_types = getattr(model.config, "layer_types", None)
    if layer_types is not None:
        assert len(layer_types) == N_LAYERS - 1
    if mt == "gemma3_text":
        assert layer_types == [LAYER_TYPES[i] for i in range(N_LAYERS) if i != SKIP]
    card = (Path(res["path"]) / "README.md").read_text()
    assert "prune-first" in card and "layer dropped" in card


@pytest.mark.parametrize("mt", ("mixtral", "qwen2_moe"))
def test_moe_written_per_expert(mt: str, exports: dict) -> None:
    """MoE experts are stored in the per-expert layout save_pretrained writes."""
    files = list(Path(exports[mt]["stock"]["path"]).glob("*.safetensors"))
    keys = [k for f in files for k in safe_open(str(f), framework="pt").keys()]
    assert not any(k.endswith("gate_up_proj") for k in keys)
    assert any(".experts.0." in k for k in keys)


@pytest.mark.parametrize("mt", FAMILIES)
def test_non_uniform_sizes_zero_padded(mt: str, exports: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    e = exports[mt]
    res = e["mixed_export"]
    assert res["padded_params"] > 0
    got, model = _stock_logits(res["path"])
    assert (got - _streamed(e["shard"], e["mixed"], monkeypatch)).abs().max().item() <= 1e-5
    assert res["params"] == model.num_parameters()
    # Padded to the larger size: the same model shape as all layers at the larger size.
    wide = e["wide_export"]
    assert res["params"] == wide["params"] and res["intermediate_sizes"] == wide["intermediate_sizes"]
    assert res["padded_params"] > wide["padded_params"]
    assert res["ff_params"] - res["padded_params"] < wide["ff_params"] - wide["padded_params"]
    moe = family_for(model.config).moe
    if moe is not None:
        # Expert sizes are padded to a 16-byte multiple for the grouped_mm kernel (0.75 of 24 = 18 -> 20).
        assert res["intermediate_sizes"][moe.size_key] % 4 == 0
    # Sharded: several files and an index naming every tensor.
    path = Path(res["path"])
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(res["files"]) > 1 and set(index["weight_map"].values()) == set(res["files"])
    assert not [p.name for p in path.iterdir() if p.name.startswith(".")]  # layer spills removed
    assert "hand-made" in (path / "README.md").read_text()


@pytest.mark.parametrize("mt", FAMILIES)
def test_tied_form_shares_parameters(mt: str, exports: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM

    e = exports[mt]
    stock, tied = e["stock"], e["tied"]
    tdir = Path(tied["path"])
    # Smaller by exactly the duplicated FF tensors: the tied window's patch, stored once.
    with safe_open(str(next((e["uniform"] / "ff").glob(f"L{TIE[0]:05d}-*.safetensors"))), framework="pt") as f:
        patch_numel = sum(int(torch.tensor(f.get_slice(k).get_shape()).prod()) for k in f.keys())
        patch_keys = set(f.keys())
    dup = patch_numel * (len(TIE) - 1)
    assert _stored_numel(Path(stock["path"])) - _stored_numel(tdir) == dup == tied["duplicated_params"]
    assert tied["unique_params"] == stock["params"] - dup
    ties = json.loads((tdir / TIES_FILE).read_text())
    assert ties["windows"] == [[TIE[0] - 1, TIE[1] - 1]]  # renumbered after the skipped layer

    model = mlpfuse.load(tdir)
    assert ties["ties"]
    for name, src in ties["ties"].items():
        assert model.get_parameter(name) is model.get_parameter(src)
    layers = model.get_submodule(family_for(model.config).layers_path)
    a, b = (layers[j] for j in ties["windows"][0])
    ff_a = dict(a.named_parameters())
    shared = [n for n, p in b.named_parameters() if ff_a.get(n) is p]
    assert set(shared) == patch_keys  # exactly the window's FF tensors, nothing else
    assert model.num_parameters() == tied["unique_params"]
    with torch.no_grad():
        got = model(IDS, use_cache=False).logits
    assert (got - _streamed(e["shard"], e["uniform"], monkeypatch)).abs().max().item() <= 1e-5
    # Stock transformers refuses the compact form instead of loading random tensors.
    with pytest.raises((OSError, ValueError)):
        AutoModelForCausalLM.from_pretrained(tdir)


_LOADER = r"""
import importlib.abc, sys, json, torch
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("mlpfuse", "stages", "orchestrator", "cluster", "tests"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
from transformers import AutoModelForCausalLM
jobs = json.loads(sys.argv[1])
for path, out in jobs:
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        torch.save(model(torch.load(sys.argv[2]), use_cache=False).logits, out)
bad = [m for m in sys.modules if m.split(".")[0] in ("mlpfuse", "stages", "orchestrator", "cluster")]
assert not bad, bad
print("ok")
"""


def test_stock_export_loads_without_mlpfuse(exports: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh interpreter with mlpfuse's packages blocked loads every stock export."""
    torch.save(IDS, tmp_path / "ids.pt")
    jobs = [(exports[mt]["stock"]["path"], str(tmp_path / f"{mt}.pt")) for mt in FAMILIES]
    proc = subprocess.run(
        [sys.executable, "-I", "-c", _LOADER, json.dumps(jobs), str(tmp_path / "ids.pt")],
        cwd="/tmp", capture_output=True, text=True, timeout=600,
        env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
    for mt in FAMILIES:
        got = torch.load(tmp_path / f"{mt}.pt")
        ref = _streamed(exports[mt]["shard"], exports[mt]["uniform"], monkeypatch)
        assert (got - ref).abs().max().item() <= 1e-5


def test_export_base_without_overlay(exports: dict, tmp_path: Path) -> None:
    sh = exports["llama"]["shard"]
    res = export.run(export.ExportConfig(dtype="bfloat16"), {"shard": sh}, tmp_path / "base")
    meta = load_shard_meta(sh)
    assert res["params"] == meta["params"]["total"] and res["num_hidden_layers"] == N_LAYERS
    assert res["dtype"] == "bfloat16"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(res["path"])
    assert next(model.parameters()).dtype == torch.bfloat16


def test_encoder_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """BERT: exported as a base encoder that AutoModel loads, hidden states as the runner's."""
    from transformers import AutoModel

    sh = tmp_path / "shard"
    shard.run(shard.ShardConfig(model=str(_make("bert", tmp_path / "ckpt"))), {}, sh)
    ov = _overlay(sh, tmp_path / "ov", {0: 0.5, TIE[0]: 0.75})
    res = export.run(export.ExportConfig(), {"shard": sh, "overlay": ov}, tmp_path / "out")
    model = AutoModel.from_pretrained(res["path"]).eval()
    with torch.no_grad():
        got = model(IDS).last_hidden_state
    assert res["padded_params"] > 0 and model.config.num_hidden_layers == N_LAYERS - 1
    assert (got - _streamed(sh, ov, monkeypatch)).abs().max().item() <= 1e-5
    tied = export.run(export.ExportConfig(tied=True), {"shard": sh, "overlay": ov}, tmp_path / "tied")
    loaded = mlpfuse.load(tied["path"])
    assert loaded.num_parameters() == tied["unique_params"] < res["params"]
    with torch.no_grad():
        assert (loaded(IDS).last_hidden_state - got).abs().max().item() <= 1e-5


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        export.ExportConfig(max_shard_size="lots")
    with pytest.raises(ValueError):
        export.ExportConfig(tide=True)
    assert export.parse_size("2GB") == 2 * 10**9 and export.parse_size("1GiB") == 2**30


def test_every_non_weight_file_reaches_the_export(tiny_checkpoints: dict[str, Path], smollm2_tokenizer: Path,
                                                  tmp_path: Path) -> None:
    """An instruct model's chat template, generation config and other files of its directory
    travel through shard and compress to both export forms; its chat template renders the same."""
    from transformers import AutoTokenizer

    src = tmp_path / "instruct"
    shutil.copytree(tiny_checkpoints["llama"], src)
    for f in smollm2_tokenizer.iterdir():
        shutil.copy2(f, src / f.name)
    (src / "chat_template.jinja").write_text(
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    (src / "generation_config.json").write_text('{"do_sample": true, "temperature": 0.6, "top_p": 0.9}')
    (src / "notes.txt").write_text("anything a hub repository holds beside its weights")
    (src / "README.md").write_text("the base model's card")
    (src / "__init__.py").write_text("import os  # a bundled model's package: code never travels")
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    before = AutoTokenizer.from_pretrained(src).apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    sd = tmp_path / "shard"
    shard.run(shard.ShardConfig(model=str(src)), {}, sd)
    ov = tmp_path / "ov"
    ov.mkdir()
    compress.run(compress.CompressConfig.model_validate(
        {"candidate": {"method": "prune", "criterion": "magnitude", "ratio": 0.5}}), {"shard": sd}, ov)
    for tied in (False, True):
        model_dir = Path(export.run(export.ExportConfig(tied=tied), {"shard": sd, "overlay": ov},
                                    tmp_path / f"e{tied}")["path"])
        for name in ("chat_template.jinja", "generation_config.json", "notes.txt", "tokenizer.json"):
            assert (model_dir / name).read_bytes() == (src / name).read_bytes(), name
        assert "the base model's card" not in (model_dir / "README.md").read_text()  # the export's own card
        assert not (model_dir / "__init__.py").exists()
        after = AutoTokenizer.from_pretrained(model_dir).apply_chat_template(chat, tokenize=False,
                                                                              add_generation_prompt=True)
        assert after == before and "<|assistant|>" in after

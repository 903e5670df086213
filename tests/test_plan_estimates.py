"""``mlpfuse plan`` on the cluster examples (Qwen2.5-7B dense, Qwen3-30B-A3B MoE) prints each
stage's disk, tokens and time from the checkpoint's metadata alone.

This machine cannot reach the Hugging Face hub, so the hub client's two metadata calls are
answered from the models' published ``config.json`` values and file sizes; any other hub call (a
weight download, a snapshot) fails the test: planning must never ask for one."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from mlpfuse.orchestrator.cli import main
from mlpfuse.orchestrator.estimate import ModelShape, estimate
from mlpfuse.orchestrator.spec import load_spec
from mlpfuse.stages.model.checkpoint import model_metadata

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

HUB = {
    "Qwen/Qwen2.5-7B": ({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
        "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
        "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 131072,
        "rope_theta": 1000000.0, "rms_norm_eps": 1e-06, "tie_word_embeddings": False, "hidden_act": "silu",
        "torch_dtype": "bfloat16"}, [3945441440, 3864726320, 3864726424, 3556377672]),
    "Qwen/Qwen3-30B-A3B": ({
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048,
        "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48,
        "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
        "num_experts_per_tok": 8, "vocab_size": 151936, "max_position_embeddings": 40960,
        "rope_theta": 1000000.0, "rms_norm_eps": 1e-06, "tie_word_embeddings": False, "hidden_act": "silu",
        "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True, "torch_dtype": "bfloat16"},
        [3_999_000_000] * 15 + [1_080_000_000]),
}


@pytest.fixture()
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The hub's metadata answers; ``calls`` records every hub request."""
    import huggingface_hub

    calls: list[str] = []

    def hf_hub_download(repo_id: str, filename: str, **kw: object) -> str:
        calls.append(f"download {repo_id}/{filename}")
        if filename != "config.json" or repo_id not in HUB:
            raise AssertionError(f"planning asked the hub for {repo_id}/{filename}")
        d = tmp_path / repo_id.replace("/", "--")
        d.mkdir(exist_ok=True)
        (d / "config.json").write_text(json.dumps(HUB[repo_id][0]))
        return str(d / "config.json")

    def model_info(self: object, repo_id: str, files_metadata: bool = False, **kw: object) -> SimpleNamespace:
        calls.append(f"info {repo_id}")
        sizes = HUB[repo_id][1]
        files = [SimpleNamespace(rfilename=f"model-{i + 1:05d}-of-{len(sizes):05d}.safetensors", size=s)
                 for i, s in enumerate(sizes)]
        return SimpleNamespace(sha="0" * 40, siblings=[SimpleNamespace(rfilename="config.json", size=700), *files])

    def refuse(*a: object, **kw: object) -> None:
        calls.append("snapshot")
        raise OSError("not in the local cache")  # model_key then reads the hub's file list

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    return calls


@pytest.mark.parametrize("example, params, active, layers", [
    ("qwen2.5-7b-cluster.yaml", 7.6e9, 7.6e9, 28),
    ("qwen3-30b-a3b-cluster.yaml", 30.5e9, 3.3e9, 48),
])
def test_plan_prints_disk_tokens_and_time_without_weights(example: str, params: float, active: float, layers: int,
                                                          hub: list[str], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    spec_path = tmp_path / example
    # Here: a local cache and a bundled corpus instead of the cluster's bucket and datasets cache.
    text = (EXAMPLES / example).read_text().replace("s3://SET-ME-bucket/mlpfuse", str(tmp_path / "c"))
    spec_path.write_text(text.replace("hf:Salesforce/wikitext:wikitext-103-raw-v1@train", "shakespeare"))
    spec = load_spec(spec_path)
    assert spec.budget is not None and spec.distill is not None and spec.distill.workers > 1
    assert main(["plan", str(spec_path)]) == 0
    out = capsys.readouterr().out
    assert all(c.startswith(("info", "snapshot", "download " + spec.model + "/config.json")) for c in hub), hub
    shape = ModelShape.from_config(*model_metadata(spec.model))
    assert shape.layers == layers
    assert shape.params == pytest.approx(params, rel=0.02) and shape.active_params == pytest.approx(active, rel=0.05)
    est = {e.name: e for e in estimate(spec, shape)}
    assert {"shard", "collect", "evaluate", "export", "distill"} <= set(est)
    assert est["shard"].disk_bytes == sum(HUB[spec.model][1])
    assert est["collect"].tokens == spec.data.calib_tokens
    total = sum(e.disk_bytes for e in est.values())
    assert total < 0.9 * 2**40, f"{total / 1e12:.2f} TB: the example must fit a 1 TiB volume"
    for name in ("shard", "collect", "distill", "total disk"):
        assert any(line.strip().startswith(name) for line in out.splitlines()), (name, out)
    print(out)


def test_collect_disk_follows_the_features_kept(hub: list[str]) -> None:
    """The estimate counts each kept feature kind: dropping up/gate/hidden from a 7B spec divides
    collect's disk by the share they take."""
    from mlpfuse.orchestrator.spec import parse_spec

    shape = ModelShape.from_config(*model_metadata("Qwen/Qwen2.5-7B"))
    spec = {"model": "Qwen/Qwen2.5-7B", "data": {"corpus": "shakespeare", "calib_tokens": 1 << 20}}
    full = {e.name: e for e in estimate(parse_spec(spec), shape)}["collect"]
    lean = {e.name: e for e in estimate(parse_spec({**spec, "collect": {"features": [], "gram_max": 0}}), shape)}["collect"]
    per_token_layer = 3 * 18944 * 2 + 3584 * 4
    assert full.disk_bytes - lean.disk_bytes == 3 * 18944 * 2 * 28 * (1 << 20) + 28 * 0  # features only
    assert full.disk_bytes >= per_token_layer * 28 * (1 << 20)  # ~2.7 MB per token: terabytes at 1M tokens


def test_evaluation_tokens_count_every_held_out_set() -> None:
    """eval_tokens is per held-out set: a mix of two corpora and one unseen corpus scores three."""
    from mlpfuse.orchestrator.spec import parse_spec

    shape = ModelShape(layers=4, hidden=64, params=10**9, active_params=10**9, stored_bytes=2 * 10**9, ff_width=256,
                       experts=0, expert_width=0, top_k=0, shared_width=0, ff_params=6 * 10**8)
    one = {e.name: e for e in estimate(parse_spec({"model": "m", "data": {"eval_tokens": 1000}}), shape)}
    three = {e.name: e for e in estimate(parse_spec({"model": "m", "data": {
        "corpus": ["shakespeare", "python-code"], "unseen": ["python-docs"], "eval_tokens": 1000}}), shape)}
    assert one["evaluate"].tokens == 1000 and three["evaluate"].tokens == 3000

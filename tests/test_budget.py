"""The size budget end to end on a tiny model: candidates meet the budget, the winner is the best
candidate evaluated, re-targeting reuses the base stages, and impossible budgets exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mlpfuse.orchestrator.budget import (
    BudgetSpec,
    HalvingSpec,
    ModelFacts,
    halving_budgets,
    plan_candidates,
)
from mlpfuse.orchestrator.cli import main
from mlpfuse.stages.samples import SamplesConfig


def _spec(tmp: Path, model: Path, target: dict, cache: Path | None = None, methods: list[str] | None = None,
          **extra: object) -> Path:
    spec = {
        "name": "b", "model": str(model), "cache": str(cache or tmp / "cache"), "output": str(tmp / "out"),
        "data": {"corpus": "shakespeare", "block_size": 64, "calib_tokens": 512, "eval_tokens": 512},
        "evaluate": {"window": 64, "stride": 64, "max_tokens": 448},  # the final round scores these too
        "budget": {"target": target, "methods": methods or ["prune", "layer_drop", "combo"],
                   "halving": {"min_tokens": 64}},
    }
    for k, v in extra.items():
        spec[k] = {**spec[k], **v} if isinstance(spec.get(k), dict) else v
    p = tmp / f"spec-{len(list(tmp.glob('spec-*')))}.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p


def _artifacts(cache: Path) -> set[str]:
    return {str(p.parent.relative_to(cache)) for p in (cache / "artifacts").rglob("manifest.json")}


def test_halving_budgets_grow_to_full() -> None:
    assert halving_budgets(20, 4096, HalvingSpec(min_tokens=512, factor=2)) == [512, 1024, 2048, 4096]
    assert halving_budgets(1, 4096, HalvingSpec(min_tokens=512)) == [4096]


def test_planner_sizes_every_candidate_to_the_budget() -> None:
    facts = ModelFacts(num_layers=6, params=1000, ff_params=600, layer_params=[150] * 6, ff_layer_params=[100] * 6,
                       cos=[0.1, 0.9, 0.5, 0.8, 0.7, 0.2])
    cands, skipped = plan_candidates(BudgetSpec(target={"params": 0.8}), facts)
    names = {c.name for c in cands}
    assert {"prune-activation-uniform", "prune-magnitude-uniform+refit", "fusion-uniform", "layer-drop-2"} <= names
    drop = next(c for c in cands if c.name == "layer-drop-2")
    assert set(drop.config.candidate.layers) == {1, 3}  # the layers that change the hidden state least
    assert any(s["method"] == "merge" for s in skipped)  # no savings in the stock export
    prune = next(c for c in cands if c.name == "prune-activation-uniform")
    assert 600 * (1 - prune.config.candidate.ratio) >= 200  # removes at least the 200 asked for
    assert not names & {"layer-drop-2-map", "prune-obs-uniform"}  # no foldable map known, no HᵀH collected


def test_planner_adds_obs_where_collect_kept_grams_and_the_map_where_it_folds() -> None:
    facts = ModelFacts(num_layers=6, params=1000, ff_params=600, layer_params=[150] * 6, ff_layer_params=[100] * 6,
                       cos=[0.1, 0.9, 0.5, 0.8, 0.7, 0.2], gram=True, map_foldable=True)
    cands = {c.name: c for c in plan_candidates(BudgetSpec(target={"params": 0.8}), facts)[0]}
    plain, mapped = cands["layer-drop-2"].config.candidate, cands["layer-drop-2-map"].config.candidate
    assert mapped.layers == plain.layers and mapped.linear_map and not plain.linear_map  # like for like
    assert "layer-drop-2-map+refit" not in cands  # nothing to refit
    obs = cands["prune-obs-uniform"].config.candidate
    assert obs.criterion == "obs" and obs.ratio == cands["prune-activation-uniform"].config.candidate.ratio
    assert "prune-obs-uniform+refit" in cands


def test_hand_given_candidates_keep_their_method_family() -> None:
    facts = ModelFacts(num_layers=6, params=1000, ff_params=600, layer_params=[150] * 6, ff_layer_params=[100] * 6,
                       cos=[0.1, 0.9, 0.5, 0.8, 0.7, 0.2])
    spec = BudgetSpec(target={"params": 0.8}, methods=[], export="tied", candidates=[
        {"candidate": {"method": "merge", "start": 1, "size": 3}},
        {"candidate": {"method": "prune", "ratio": 0.5}, "drop": [2]},
        {"candidate": {"method": "prune", "ratio": 0.5}}])
    cands, _ = plan_candidates(spec, facts)
    assert [(c.name, c.family, c.custom) for c in cands] == [
        ("custom-0-merge", "merge", True), ("custom-1-prune", "combo", True), ("custom-2-prune", "prune", True)]


def test_budget_run_picks_best_and_retargets(tiny_lm: Path, tmp_path: Path, ray_local) -> None:
    cache = tmp_path / "cache"
    assert main(["run", str(_spec(tmp_path, tiny_lm, {"params": 0.9}, cache))]) == 0
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    budget = rep["budget"]["budget"]
    finals = [c for c in rep["candidates"] if c["rounds"] and c["rounds"][-1]["tokens"] == rep["base"]["eval_tokens"]]
    assert all(c["params"] <= budget for c in rep["candidates"])
    # Planned sizes round down: no pruning candidate is built over the budget and dropped.
    assert not [s for s in rep["skipped"] if s["method"].startswith("prune") and "over the budget" in s["why"]]
    assert rep["winner"]["perplexity"] == min(c["perplexity"] for c in finals)
    assert "won on the worst held-out set" in rep["winner"]["reason"]  # one set: its ratio orders as perplexity
    assert set(rep["winner"]["sets"]) == set(rep["base"]["sets"]) == {"shakespeare"}
    assert rep["winner"]["sets"]["shakespeare"]["ratio"] == pytest.approx(
        rep["winner"]["perplexity"] / rep["base"]["perplexity"], rel=1e-6)  # the full set: the same windows
    assert [s["prompt"] for s in rep["samples"]] == list(SamplesConfig().prompts)
    assert "Greedy continuations" in (tmp_path / "out" / "report.html").read_text()
    # Each round scores only the windows beyond the previous round's and adds its sums: a finalist's
    # rounds together did one full evaluation's work, and its score is that evaluation's.
    from mlpfuse.stages import evaluate

    base_metrics = json.loads((Path(rep["stages"]["evaluate"]["path"]) / "metrics.json").read_text())
    for c in finals:
        assert len(c["rounds"]) > 1 and [x["tokens"] for x in c["rounds"]] == sorted({x["tokens"] for x in c["rounds"]})
        assert sum(x["layer_tokens"] for x in c["rounds"]) == base_metrics["layer_tokens"]
    won = next(c for c in rep["candidates"] if c["name"] == rep["winner"]["name"])
    direct = evaluate.run(evaluate.EvaluateConfig(window=64, stride=64, max_tokens=448),
                          {"shard": Path(rep["stages"]["shard"]["path"]), "data": Path(rep["stages"]["data"]["path"]),
                           "overlay": Path(rep["stages"][f"compress.{won['name']}"]["path"])}, tmp_path)
    assert won["rounds"][-1]["tokens"] == direct["tokens"]
    assert won["perplexity"] == pytest.approx(direct["perplexity"], rel=1e-5)
    # Prefix sharing is skipped: a few layer-drop candidates would save fewer layer-forwards in the
    # first 64-token round than the base pass over the full 448 tokens costs.
    rounds = [x for c in rep["candidates"] for x in c["rounds"]]
    assert not rep["budget"]["share_prefix"] and "prefix" not in rep["stages"]
    assert all(x["start_layer"] == 0 for x in rounds)
    assert rep["budget"]["layer_tokens"] == rep["budget"]["layer_tokens_without_prefix"]
    # Per-layer errors of each method's best candidate (layer drop has no FF block to compare).
    assert set(rep["layer_errors"]) and set(rep["layer_errors"]) == set(rep["ntk_errors"])
    for name, errs in rep["layer_errors"].items():
        assert len(errs) == 6 and any(e is not None and e > 0 for e in errs), name
    assert (tmp_path / "out" / "report.html").exists()
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "export")
    assert exported.num_parameters() == rep["winner"]["params"]
    # The checkpoint carries the spec that made it and its quality figures.
    from mlpfuse.orchestrator.spec import load_spec

    carried = load_spec(tmp_path / "out" / "export" / "mlpfuse.yaml")
    assert carried.budget == load_spec(_spec(tmp_path, tiny_lm, {"params": 0.9}, cache)).budget
    card = (tmp_path / "out" / "export" / "README.md").read_text()
    assert f"{rep['base']['perplexity']:.3f}" in card and f"{rep['winner']['perplexity']:.3f}" in card
    assert rep["winner"]["reason"] in card
    cached_card = Path(rep["stages"]["export"]["path"]) / "model" / "README.md"
    assert "## Quality" not in cached_card.read_text()  # the store's copy is untouched

    # Re-targeting: shard, data, collect and base evaluation come from the cache.
    assert main(["run", str(_spec(tmp_path, tiny_lm, {"params": 0.8}, cache))]) == 0
    rep2 = json.loads((tmp_path / "out" / "report.json").read_text())
    for name in ("shard", "data", "collect", "collect.part0", "evaluate"):
        assert rep2["stages"][name]["status"] == "hit", name
    assert rep2["budget"]["budget"] < budget


def test_tied_merge_winner_is_distilled_and_scored(tiny_lm: Path, tmp_path: Path, ray_local) -> None:
    """A tied (merged) winner is distilled with its windows tied and only its merged FF sublayers
    training; the result is scored as an overlay on the base shard and handed over only if better."""
    import mlpfuse

    distill = {"train": {"steps": 3, "lr": 1e-3, "zero_stage": 2, "micro_batch": 2, "grad_accum": 1,
                         "checkpoint_every": 2, "seed": 0}, "max_blocks": 8}
    # One round on every token: the merge windows start at layers 0..3 and share the base's prefix.
    spec = _spec(tmp_path, tiny_lm, {"ff_params": 0.7}, methods=["merge"],
                 budget={"export": "tied", "halving": {"min_tokens": 10**6}}, distill=distill)
    assert main(["run", str(spec)]) == 0
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    rounds = [x for c in rep["candidates"] for x in c["rounds"]]
    assert sorted({x["start_layer"] for x in rounds}) == [0, 1, 2, 3]
    assert rep["budget"]["share_prefix"] and rep["stages"]["prefix"]["status"] == "run"
    assert rep["budget"]["layer_tokens"] < rep["budget"]["layer_tokens_without_prefix"]
    d, winner = rep["distill"], rep["winner"]
    assert winner["name"].startswith("merge") and d["form"] == "tied" and d["overlay"] is True
    assert d["trainable"] == "compressed" and d["train_layers"]  # the merged window only
    assert len(d["train_layers"]) < 6
    assert d["perplexity_before"] == winner["perplexity"] and d["perplexity"] > 0
    assert rep["stages"]["evaluate.distilled"]["status"] == "run"
    assert d["kept"] == (d["perplexity"] <= d["perplexity_before"])
    assert "a baseline beat" not in winner["reason"]
    model = mlpfuse.load(tmp_path / "out" / "export")
    ties = json.loads((tmp_path / "out" / "export" / "mlpfuse_ties.json").read_text())
    assert ties and model.config.num_hidden_layers == 6


def test_merge_windows_never_mix_ff_shapes() -> None:
    """A model with dense and MoE layers (FF sublayers of different sizes): no merge window spans both."""
    facts = ModelFacts(num_layers=6, params=1000, ff_params=600, layer_params=[150] * 6,
                       ff_layer_params=[100, 100, 100, 80, 80, 80], cos=[0.1] * 6)
    cands, _ = plan_candidates(BudgetSpec(target={"ff_params": 0.8}, methods=["merge"], export="tied"), facts)
    windows = {(c.config.candidate.start, c.config.candidate.size) for c in cands}
    assert windows == {(0, 3), (3, 3)}
    with pytest.raises(Exception, match="one shape"):
        plan_candidates(BudgetSpec(target={"ff_params": 0.6}, methods=["merge"], export="tied"), facts)


def test_winner_reason_names_each_family_by_its_furthest_round() -> None:
    """A candidate dropped in the first round (scored on fewer tokens) is not its family's best
    over one that reached the last round, even with a lower first-round perplexity."""
    from mlpfuse.orchestrator.budget import Candidate, winner_reason
    from mlpfuse.stages.compress import CompressConfig

    def cand(name: str, family: str, ppls: list[tuple[int, float]]) -> Candidate:
        c = Candidate(name, CompressConfig.model_validate({"candidate": {"method": "layer_drop", "layers": [1]}}), family)
        c.rounds = [{"tokens": t, "perplexity": p} for t, p in ppls]
        return c

    early = cand("merge-early", "merge", [(64, 10.0)])
    late = cand("merge-late", "merge", [(64, 12.0), (128, 11.0)])
    prune = cand("prune-x", "prune", [(64, 9.0), (128, 9.5)])
    reason = winner_reason(prune, [early, late, prune], base_ppl=5.0)
    assert "FF merging best merge-late at 11.000 (on 128 tokens)" in reason
    assert "merge-early" not in reason and "a baseline beat the papers' methods" in reason


@pytest.mark.parametrize("target, methods, message", [
    ({"params": 0.01}, None, "no method can meet target params: 0.01"),
    ({"params": 1.5}, None, "not smaller than the model"),
    ({"params": 1.0}, None, "not smaller than the model"),
    ({"params": 10**12}, None, "not smaller than the model"),
    ({"params": 0.8}, ["prune", "pruning-magic"], "unknown method 'pruning-magic'"),
])
def test_impossible_budgets_exit_2(tiny_lm: Path, tmp_path: Path, ray_local, capsys: pytest.CaptureFixture[str],
                                   target: dict, methods: list[str] | None, message: str) -> None:
    cache = tmp_path / "cache"
    assert main(["run", str(_spec(tmp_path, tiny_lm, target, cache, methods))]) == 2
    assert message in capsys.readouterr().err
    assert not any(a.startswith("artifacts/compress") for a in _artifacts(cache)) if cache.exists() else True
    if cache.exists():
        assert list((cache / "staging").iterdir()) == []


def test_runs_publishing_one_output_at_once_never_collide(tmp_path: Path) -> None:
    """Several runs hand over to one output directory at the same moment: none fails, and the
    output is always one whole checkpoint (a user retrying while the first run still goes)."""
    import threading

    from mlpfuse.orchestrator.job import publish

    srcs = []
    for k in range(6):
        src = tmp_path / f"src{k}"
        src.mkdir()
        for name in ("config.json", "model.safetensors", "README.md"):
            (src / name).write_text(f"{k}:{name}" * 1000)
        srcs.append(src)
    dest = tmp_path / "out" / "export"
    dest.parent.mkdir()
    errors: list[BaseException] = []

    def run(src: Path) -> None:
        try:
            for _ in range(5):
                publish(src, dest, {"mlpfuse.yaml": f"name: {src.name}\n"})
        except BaseException as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    threads = [threading.Thread(target=run, args=(s,)) for s in srcs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    files = {p.name: p.read_text() for p in dest.iterdir()}
    k = files["config.json"].split(":")[0]
    assert files == {"config.json": f"{k}:config.json" * 1000, "model.safetensors": f"{k}:model.safetensors" * 1000,
                     "README.md": f"{k}:README.md" * 1000, "mlpfuse.yaml": f"name: src{k}\n"}
    assert sorted(p.name for p in dest.parent.iterdir()) == ["export"]  # no temporary copy left
    assert (srcs[0] / "README.md").read_text() == "0:README.md" * 1000  # the sources are untouched


def test_widths_round_down_to_the_export_multiple() -> None:
    """A ratio's width is rounded down to the multiple (the budget counts the neurons it keeps),
    only where the block's width is itself a multiple and one multiple stays; ``keep`` is exact."""
    from mlpfuse.stages.methods.prune import PruneMethod

    assert PruneMethod(ratio=0.6621, multiple_of=64).k(1536) == 960  # floor(1016.99) = 1016 -> 960
    assert PruneMethod(ratio=0.6621).k(1536) == 1016
    assert PruneMethod(ratio=0.5, multiple_of=64).k(48) == 24  # 48 is no multiple of 64: as it was
    assert PruneMethod(ratio=0.03, multiple_of=64).k(1536) == 46  # under one multiple: as it was
    assert PruneMethod(keep=1000, multiple_of=64).k(1536) == 1000
    facts = ModelFacts(num_layers=6, params=1000, ff_params=600, layer_params=[150] * 6, ff_layer_params=[100] * 6,
                       cos=[0.1, 0.9, 0.5, 0.8, 0.7, 0.2])
    cands, _ = plan_candidates(BudgetSpec(target={"params": 0.8}), facts, width_multiple=64)
    sized = [c for c in cands if c.family in ("prune", "fusion", "combo")]
    assert sized and all(c.config.candidate.multiple_of == 64 for c in sized)


def test_each_refit_mode_gives_its_own_candidates() -> None:
    facts = ModelFacts(num_layers=6, params=1000, ff_params=600, layer_params=[150] * 6, ff_layer_params=[100] * 6,
                       cos=[0.1, 0.9, 0.5, 0.8, 0.7, 0.2])
    spec = BudgetSpec(target={"params": 0.8}, refit=[{"mode": "down"}, {"mode": "block", "steps": 10}])
    cands = {c.name: c for c in plan_candidates(spec, facts)[0]}
    plain, down, block = (cands[f"prune-activation-uniform{s}"] for s in ("", "+refit", "+blockfit"))
    assert plain.config.candidate == down.config.candidate == block.config.candidate  # like for like
    assert (down.config.refit.mode, block.config.refit.mode, block.config.refit.steps) == ("down", "block", 10)
    assert "layer-drop-2+blockfit" not in cands  # nothing to refit
    with pytest.raises(ValueError, match="one per mode"):
        BudgetSpec(target={"params": 0.8}, refit=[{"mode": "down"}, {"mode": "down", "lam": 0.1}])


def test_damage_allocation_is_measured_before_planning(tiny_lm: Path, tmp_path: Path, ray_local) -> None:
    spec = _spec(tmp_path, tiny_lm, {"params": 0.85}, methods=["prune"],
                 budget={"export": "tied", "refit": None, "layer_errors": False, "damage": {"tokens": 64, "steps": 4}})
    assert main(["run", str(spec)]) == 0
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["stages"]["damage"]["status"] == "run"
    damage = json.loads((Path(rep["stages"]["damage"]["path"]) / "damage.json").read_text())
    assert [r["layer"] for r in damage["layers"]] == list(range(6))
    cands = {c["name"]: c for c in rep["candidates"]}
    assert "prune-damage" in cands and cands["prune-damage"]["params"] <= rep["budget"]["budget"]
    assert cands["prune-damage"]["predicted_damage"] > 0
    # mlpfuse plan lists the same candidates from the cached damage curves.
    from mlpfuse.api import plan

    assert "prune-damage" in {c["name"] for c in plan(spec).candidates}

"""probe + layer_errors: per-layer output reconstruction error and empirical NTK error of a candidate.

``probe`` runs the *original* model once, streamed, over the first held-out tokens and stores,
for every layer, what its FF sublayer sees: ``x/L<layer>.safetensors`` (``x`` [n, H] float32).
``layer_errors`` then compares, layer by layer and on those same inputs (so errors do not
compound through the network), the original FF sublayer with the candidate's:

- ``recon``: ``‖FF'(X) − FF(X)‖_F / ‖FF(X)‖_F`` over all probe tokens.
- ``ntk``: the empirical NTK restricted to the layer's FF parameters θ. A fixed random unit
  vector r (seeded per layer) turns the block into a scalar ``s_t = ⟨r, FF(x_t)⟩``;
  ``J = ∂s/∂θ`` over ``ntk_tokens`` probe tokens (a seeded subset); ``Θ = J Jᵀ`` [n, n]; the
  error is ``‖Θ' − Θ‖_F / ‖Θ‖_F``. θ' are the candidate block's own parameters in its training
  form: a pruned / merged / refit block's smaller ``up``/``gate``/``down``; a fused block's
  centroids with the count vector P fixed after the activation (``FusedMLP``:
  ``y = down_c (P ⊙ h)``, ``down_c = down_folded / P``), when the overlay stores P in
  ``counts.safetensors`` (keys ``L<layer>/<block name>`` -> P [k]); without that file the folded
  form (``P`` inside ``down``) is what is differentiated, and the result says so
  (``"p_stored": false``). P changes only the ``down`` part of the kernel: the backpropagated
  signal into ``up``/``gate`` is ``down_foldedᵀ r`` in both forms.
- ``ntk_sign``: the asymmetric SignGD kernel ``K[t, s] = ⟨J_t, sign J_s⟩`` (the kernel of Adam /
  sign-based updates, Malladi et al. 2023) with the same relative error. The MLP Fusion paper's
  NTK argument for P is about this kernel: with P, a cluster of k exact duplicates has the same
  SignGD kernel as the k neurons, whereas the plain kernel ``J Jᵀ`` then matches the "cluster"
  (√P) form instead.

Both kernels are computed in closed form (every per-token gradient of a linear map is a rank-1
outer product, so ``⟨a xᵀ, b yᵀ⟩ = (a·b)(x·y)``), in float64, O(n² (H + I)); the tests check
them against a per-token autograd loop.

MoE layers: the block output is the model's own mixture ``Σ_e w_e(x) FF_e(x)`` (+ ``σ(g·x)``
times the shared expert where the family has a shared-expert gate), with the routing weights
from the layer's own router (the router is not part of θ, so the routing is fixed); the kernel
is the sum over experts ``Σ_e (w_e w_eᵀ) ∘ Θ_e``. The mixture is checked against the MoE
module's forward at run time.

Dropped layers (``layer_drop``): the whole layer is gone, so the FF sublayer's output is
replaced by nothing and its parameters are gone: recon 1.0 and both NTK errors 1.0, by
definition. Tied windows: each layer of the window is scored on its own inputs against its own
original block (the kernel restricted to that layer's use of the shared parameters).
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file
from torch import Tensor

from mlpfuse.core.artifacts import save_safetensors, write_atomic, write_json_atomic
from mlpfuse.core.errors import DataError, NumericalError
from mlpfuse.stages.data import read_eval
from mlpfuse.stages.math.ffweights import FFWeights
from mlpfuse.stages.math.ntk import Kernels, ff_kernels, rel_error
from mlpfuse.stages.model.families import FamilyAdapter, FFBlockRef
from mlpfuse.stages.model.overlay import read_overlay
from mlpfuse.stages.model.runner import LayerStreamedModel

COUNTS = "counts.safetensors"


class ProbeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Held-out tokens whose FF inputs are stored (the first ones of the evaluation split).
    tokens: int = Field(512, ge=1)
    # Longest sequence run through the model (longer documents are cut into windows).
    window: int = Field(256, ge=2)


class LayerErrorsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Probe tokens in the NTK batch (a seeded random subset of the probe's tokens).
    ntk_tokens: int = Field(64, ge=1)
    seed: int = 0


def _x_rel(i: int) -> str:
    return f"x/L{i:05d}.safetensors"


def read_probe(probe_dir: Path, layer: int) -> Tensor:
    """The original model's FF inputs of ``layer``: [n, H] float32."""
    return load_file(str(probe_dir / _x_rel(layer)))["x"]


# ----- probe --------------------------------------------------------------------------------------
def _sequences(streams: list[np.ndarray], tokens: int, window: int) -> list[np.ndarray]:
    out, total = [], 0
    for ids in streams:
        for b in range(0, len(ids), window):
            seq = ids[b : b + window][: tokens - total]
            if len(seq):
                out.append(seq)
                total += len(seq)
            if total >= tokens:
                return out
    return out


def run_probe(config: ProbeConfig, inputs: dict[str, Path], out_dir: Path) -> dict:
    """Inputs: ``shard`` and ``data`` (its held-out split). One streamed pass of the original
    model; one layer resident; each layer's FF input saved as it is seen."""
    model = LayerStreamedModel(inputs["shard"])
    seqs = _sequences(read_eval(inputs["data"]), config.tokens, config.window)
    if not seqs:
        raise DataError("the evaluation split has no tokens to probe with")
    groups: dict[int, list[np.ndarray]] = {}
    for s in seqs:  # equal lengths share a batch; order within the probe is by (length, position)
        groups.setdefault(len(s), []).append(s)
    batches = [torch.from_numpy(np.stack(g)) for _, g in sorted(groups.items(), reverse=True)]
    states = [model.start(b) for b in batches]
    for i in range(model.num_layers):
        captured: list[Tensor] = []

        def pre(module: torch.nn.Module, args: tuple, captured: list[Tensor] = captured) -> None:
            captured.append(args[0].detach().reshape(-1, args[0].shape[-1]).float())

        with model.layer(i) as layer:
            handle = layer.get_submodule(model.family.ff_module).register_forward_pre_hook(pre)
            try:
                with torch.no_grad():
                    for state in states:
                        state.hidden = model.apply(layer, i, state)
            finally:
                handle.remove()
        x = torch.cat(captured).contiguous()
        write_atomic(out_dir / _x_rel(i), partial(save_safetensors, {"x": x}))
    n = sum(len(s) for s in seqs)
    meta = {"tokens": n, "sequences": len(seqs), "layers": model.num_layers,
            "hidden": int(x.shape[1]), "ff_module": model.family.ff_module}
    write_json_atomic(out_dir / "probe.json", meta)
    return meta


# ----- one layer ----------------------------------------------------------------------------------
def _blocks(family: FamilyAdapter, config: object, sd: dict[str, Tensor]) -> dict[FFBlockRef, FFWeights]:
    return {r: family.read_ff(config, sd, r).to(torch.float64) for r in family.ff_blocks(config, sd)}


def _mixing(model: LayerStreamedModel, i: int, sd: dict[str, Tensor], refs: list[FFBlockRef],
            x: Tensor) -> dict[FFBlockRef, Tensor]:
    """Per-token coefficient [n] of every block in the layer's output: 1 for a dense block; the
    router's top-k weight (0 where not routed) for an expert; the shared-expert gate for it."""
    if not any(r.kind == "expert" for r in refs):
        return {r: torch.ones(x.shape[0], dtype=torch.float64) for r in refs}
    family = model.family
    assert family.moe is not None
    n_exp = sum(r.kind == "expert" for r in refs)
    with model.layer(i, sd) as layer, torch.no_grad():
        moe = layer.get_submodule(family.ff_module)
        _, w, idx = layer.get_submodule(family.moe.router_module)(x.to(model.dtype))
        coef = torch.zeros(x.shape[0], n_exp, dtype=torch.float64).scatter_add_(1, idx.long(), w.double())
        out = {r: coef[:, r.expert] for r in refs if r.kind == "expert"}
        shared_gate = getattr(moe, "shared_expert_gate", None)
        for r in refs:
            if r.kind == "shared":
                g = torch.ones(x.shape[0], dtype=torch.float64) if shared_gate is None else \
                    torch.sigmoid(shared_gate(x.to(model.dtype)).double()).reshape(-1)
                out[r] = g
        module_y = moe(x[None].to(model.dtype))
        module_y = (module_y[0] if isinstance(module_y, tuple) else module_y).reshape(x.shape).double()
    mix = sum((out[r][:, None] * ff.forward(x.double()) for r, ff in _blocks(family, model.config, sd).items()),
              torch.zeros((), dtype=torch.float64))
    err = rel_error(mix, module_y)
    if not err < 1e-3:
        raise NumericalError(f"layer {i}: the routed mixture of FF blocks differs from the MoE module's "
                             f"output (relative error {err:.2e}); this family's MoE is not modelled here")
    return out


def _layer_output(blocks: dict[FFBlockRef, FFWeights], mix: dict[FFBlockRef, Tensor], x: Tensor) -> Tensor:
    y = torch.zeros(x.shape, dtype=torch.float64)
    for ref, ff in blocks.items():
        y += mix[ref][:, None] * ff.forward(x)
    return y


def _layer_kernels(blocks: dict[FFBlockRef, FFWeights], mix: dict[FFBlockRef, Tensor], x: Tensor, r: Tensor,
                   scales: dict[FFBlockRef, Tensor]) -> Kernels:
    total: Kernels | None = None
    for ref, ff in blocks.items():
        k = ff_kernels(ff, x, r, scales.get(ref)).weighted(mix[ref])
        total = k if total is None else total + k
    assert total is not None
    return total


def _r(seed: int, layer: int, h: int) -> Tensor:
    g = torch.Generator().manual_seed(1_000_003 * seed + layer)
    r = torch.randn(h, generator=g, dtype=torch.float64)
    return r / r.norm()


def ntk_index(n: int, config: LayerErrorsConfig) -> Tensor:
    """The probe tokens in the NTK batch (seeded subset, sorted)."""
    m = min(config.ntk_tokens, n)
    g = torch.Generator().manual_seed(config.seed)
    return torch.randperm(n, generator=g)[:m].sort().values


def layer_error(model: LayerStreamedModel, i: int, new_sd: dict[str, Tensor], x: Tensor,
                config: LayerErrorsConfig, counts: dict[str, Tensor] | None = None) -> dict[str, float]:
    """Errors of layer ``i`` whose tensors become ``new_sd`` (the base layer's otherwise)."""
    family, cfg = model.family, model.config
    base_sd = model.layer_state(i)
    x = x.to(torch.float64)
    old, new = _blocks(family, cfg, base_sd), _blocks(family, cfg, new_sd)
    mix_old = _mixing(model, i, base_sd, list(old), x)
    mix_new = _mixing(model, i, new_sd, list(new), x)
    y, y2 = _layer_output(old, mix_old, x), _layer_output(new, mix_new, x)
    scales = {ref: counts[f"L{i:05d}/{ref.name}"] for ref in new
              if counts is not None and f"L{i:05d}/{ref.name}" in counts}
    idx = ntk_index(x.shape[0], config)
    r = _r(config.seed, i, x.shape[1])
    sub = lambda m: {ref: c[idx] for ref, c in m.items()}  # noqa: E731
    k = _layer_kernels(old, sub(mix_old), x[idx], r, {})
    k2 = _layer_kernels(new, sub(mix_new), x[idx], r, scales)
    out = {"recon": rel_error(y2, y), "ntk": rel_error(k2.ntk, k.ntk), "ntk_sign": rel_error(k2.sign, k.sign)}
    if not all(np.isfinite(v) for v in out.values()):
        raise NumericalError(f"layer {i}: non-finite errors {out}")
    return out


def run(config: LayerErrorsConfig, inputs: dict[str, Path], out_dir: Path) -> dict:
    """Inputs: ``shard``, ``probe`` (the probe stage's output) and ``overlay`` (a compress
    artifact: the candidate). Writes and returns ``layer_errors.json``."""
    model = LayerStreamedModel(inputs["shard"])
    overlay_dir = inputs["overlay"]
    meta = read_overlay(overlay_dir)
    counts = load_file(str(overlay_dir / COUNTS)) if (overlay_dir / COUNTS).exists() else None
    n_layers = model.num_layers
    recon: list[float | None] = [None] * n_layers
    ntk: list[float | None] = [None] * n_layers
    ntk_sign: list[float | None] = [None] * n_layers
    for i in meta.skip:
        recon[i] = ntk[i] = ntk_sign[i] = 1.0
    for i, state in meta.iter_states(model.layer_state):
        e = layer_error(model, i, state, read_probe(inputs["probe"], i), config, counts)
        recon[i], ntk[i], ntk_sign[i] = e["recon"], e["ntk"], e["ntk_sign"]
    n = int(json.loads((inputs["probe"] / "probe.json").read_text())["tokens"])
    result = {
        "layers": list(range(n_layers)), "recon": recon, "ntk": ntk, "ntk_sign": ntk_sign,
        "skipped": sorted(meta.skip),
        "p_stored": counts is not None, "tokens": n, "ntk_tokens": min(config.ntk_tokens, n),
    }
    write_json_atomic(out_dir / "layer_errors.json", result)
    return result

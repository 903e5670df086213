"""distill: a real DeepSpeed engine (ZeRO 0, 2, 3) on CPU against a plain torch loop, resume, and
the Ray Train path (opt-in, ``-m cluster``).

Models are a tiny random Llama; the student is a perturbed copy of the teacher whose two layers
share one MLP (as FF merging leaves them), so every run also checks that ties survive ZeRO.
Run with ``OMP_NUM_THREADS=1`` (bit-exact comparisons between processes assume one thread count).
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from transformers import LlamaConfig, LlamaForCausalLM

from mlpfuse.core.errors import InputError
from mlpfuse.stages.model.trainer import (
    ADAMW_BETAS,
    ADAMW_EPS,
    ADAMW_WEIGHT_DECAY,
    PROGRESS_FILE,
    DistillConfig,
    DistillResult,
    distill,
    ff_parameter_names,
)
from mlpfuse.stages.model.zero import zero_config

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
}
STEPS = 8
LR = 1e-2


def make_models(*, tie_embeddings: bool = False) -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    """(teacher, student): the student is the teacher with noisy MLPs, layer 1 sharing layer 0's."""
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=tie_embeddings))
    student = copy.deepcopy(teacher)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if ".mlp." in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    student.model.layers[1].mlp = student.model.layers[0].mlp
    return teacher, student


def make_batches(n: int = 6, micro_batch: int = 2, seq: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return [torch.randint(0, TINY["vocab_size"], (micro_batch, seq), generator=g) for _ in range(n)]


def make_config(**overrides) -> DistillConfig:
    base = {
        "steps": STEPS,
        "lr": LR,
        "zero_stage": 2,
        "micro_batch": 2,
        "grad_accum": 2,
        "checkpoint_every": 2,
        "seed": 0,
    }
    return DistillConfig(**{**base, **overrides})


def plain_distill(student, teacher, batches, config: DistillConfig) -> list[float]:
    """The same training written as a plain torch loop: loss = mean over decoder layers of the MSE
    of hidden states (+ weighted LM loss), gradient accumulation, clipping, AdamW."""
    shipped = zero_config(config.zero_stage, micro_batch=1, grad_accum=1)
    clip = shipped["gradient_clipping"]
    trainable = (
        ff_parameter_names(student)
        if config.trainable != "all"  # "compressed" without train_layers: every FF sublayer
        else {n for n, _ in student.named_parameters()}
    )
    params = []
    for name, p in student.named_parameters():
        p.requires_grad_(name in trainable)
        if name in trainable:
            params.append(p)
    opt = torch.optim.AdamW(
        params, lr=config.lr, betas=ADAMW_BETAS, eps=ADAMW_EPS, weight_decay=ADAMW_WEIGHT_DECAY
    )
    teacher.eval()
    student.train()
    losses = []
    for step in range(config.steps):
        total = 0.0
        for micro in range(config.grad_accum):
            ids = batches[(step * config.grad_accum + micro) % len(batches)]
            with torch.no_grad():
                want = teacher(input_ids=ids, output_hidden_states=True).hidden_states
            out = student(input_ids=ids, labels=ids, output_hidden_states=True)
            loss = torch.stack(
                [F.mse_loss(s, t) for s, t in zip(out.hidden_states[1:], want[1:], strict=True)]
            ).mean()
            loss = loss + config.lm_loss_weight * out.loss
            (loss / config.grad_accum).backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        opt.zero_grad()
        losses.append(total / config.grad_accum)
    for p in student.parameters():
        p.requires_grad_(True)
    return losses


def max_weight_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    pb = dict(b.named_parameters())
    return max((p - pb[n]).abs().max().item() for n, p in a.named_parameters())


@pytest.fixture(scope="session")
def process_group(tmp_path_factory):
    """One world-size-1 gloo group for every in-process distill call (loopback only: file
    rendezvous, gloo on the loopback interface); destroyed at the end so the process exits."""
    if torch.distributed.is_initialized():
        yield
        return
    previous = os.environ.get("GLOO_SOCKET_IFNAME")
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    store = tmp_path_factory.mktemp("pg") / "rendezvous"
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{store}", rank=0, world_size=1
    )
    if previous is None:
        os.environ.pop("GLOO_SOCKET_IFNAME")
    else:
        os.environ["GLOO_SOCKET_IFNAME"] = previous
    yield
    import deepspeed.comm

    if deepspeed.comm.is_initialized():
        deepspeed.comm.destroy_process_group()
    elif torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Inputs


def test_config_is_strict():
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        make_config(stepz=3)
    with pytest.raises(ValidationError, match="zero_stage 2 or 3"):
        make_config(zero_stage=0, offload_optimizer=True)
    with pytest.raises(ValidationError):
        make_config(zero_stage=1)
    config = make_config()
    with pytest.raises(ValidationError):
        config.steps = 3  # frozen
    assert config.trainable == "compressed" and config.train_layers is None and config.lm_loss_weight == 0.0 and config.layer_loss == "mse"


def test_teacher_must_not_be_the_student(tmp_path):
    teacher, student = make_models()
    with pytest.raises(ValueError, match="teacher is the student"):
        distill(student, student, make_batches(), make_config(), tmp_path)
    teacher.model.layers[0].mlp = student.model.layers[0].mlp
    with pytest.raises(ValueError, match="share parameter storage"):
        distill(student, teacher, make_batches(), make_config(), tmp_path)
    assert not (tmp_path / PROGRESS_FILE).exists()


def test_batches_are_checked(tmp_path):
    teacher, student = make_models()
    with pytest.raises(ValueError, match="micro_batch=2"):
        distill(student, teacher, make_batches(micro_batch=3), make_config(), tmp_path)
    with pytest.raises(ValueError, match="integer tensor"):
        distill(student, teacher, [torch.zeros(2, 8)], make_config(), tmp_path)


def test_ff_parameters_across_families():
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

    _, llama = make_models()
    names = ff_parameter_names(llama)
    assert names == {
        f"model.layers.0.mlp.{k}_proj.weight" for k in ("gate", "up", "down")
    }  # layer 1 is tied

    gpt2 = GPT2LMHeadModel(
        GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64, n_positions=32)
    )
    names = ff_parameter_names(gpt2)
    assert (
        "transformer.h.0.mlp.c_proj.weight" in names
        and "transformer.h.0.attn.c_proj.weight" not in names
    )

    bert = BertModel(
        BertConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            intermediate_size=64,
            vocab_size=64,
        )
    )
    names = ff_parameter_names(bert)
    assert {
        "encoder.layer.0.intermediate.dense.weight",
        "encoder.layer.0.output.dense.weight",
    } <= names
    assert not any("attention" in n for n in names)


# ---------------------------------------------------------------------------------------------
# DeepSpeed vs the plain loop


@pytest.mark.parametrize(
    ("zero_stage", "trainable", "lm_loss_weight", "tie_embeddings"),
    [
        (0, "ff", 0.0, False),
        (2, "ff", 0.0, False),
        (3, "ff", 0.0, False),
        (2, "all", 0.5, True),
        (3, "all", 0.5, True),
    ],
)
def test_zero_matches_plain_loop(
    process_group, tmp_path, zero_stage, trainable, lm_loss_weight, tie_embeddings
):
    config = make_config(zero_stage=zero_stage, trainable=trainable, lm_loss_weight=lm_loss_weight)
    batches = make_batches()
    teacher, student = make_models(tie_embeddings=tie_embeddings)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    teacher_before = copy.deepcopy(teacher.state_dict())
    plain = copy.deepcopy(student)
    want = plain_distill(plain, teacher, batches, config)

    result = distill(student, teacher, batches, config, tmp_path, progress=False)

    loss_diff = max(abs(a - b) / abs(b) for a, b in zip(result.losses, want, strict=True))
    weight_diff = max_weight_diff(student, plain)
    print(
        f"ZeRO-{zero_stage} {trainable} lm={lm_loss_weight}: loss {want[0]:.4f} -> {want[-1]:.4f}, "
        f"max rel loss diff {loss_diff:.2e}, max abs weight diff {weight_diff:.2e}"
    )
    assert result == DistillResult(losses=result.losses, steps_done=STEPS, resumed_from=None)
    assert result.losses[-1] < 0.9 * result.losses[0]
    assert loss_diff < 1e-5
    assert weight_diff < 1e-5
    # Ties survive: one Parameter object for both layers' MLP (and embeddings/head when tied).
    assert student.model.layers[1].mlp.up_proj.weight is student.model.layers[0].mlp.up_proj.weight
    if tie_embeddings:
        assert student.lm_head.weight is student.model.embed_tokens.weight
    # trainable="ff" leaves everything outside the FF sublayers bit-identical.
    ff = ff_parameter_names(student)
    for name, p in student.named_parameters():
        moved = not torch.equal(p, before[name])
        assert moved == (trainable == "all" or name in ff), name
    assert all(p.requires_grad for p in student.parameters())  # flags restored
    for name, tensor in teacher.state_dict().items():  # the teacher stays frozen
        assert torch.equal(tensor, teacher_before[name]), name
    assert not teacher.training and student.training is True


# ---------------------------------------------------------------------------------------------
# Checkpoints and resume


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_resume_equals_uninterrupted_run(process_group, tmp_path, zero_stage):
    config = make_config(zero_stage=zero_stage)
    batches = make_batches()
    teacher, reference = make_models()
    full = distill(reference, teacher, batches, config, tmp_path / "full", progress=False)

    teacher, student = make_models()
    first = distill(
        student,
        teacher,
        batches,
        config.model_copy(update={"steps": 3}),
        tmp_path / "split",
        progress=False,
    )
    assert (first.steps_done, first.resumed_from) == (3, None)
    saved = json.loads((tmp_path / "split" / PROGRESS_FILE).read_text())
    assert saved["steps_done"] == 3 and saved["losses"] == first.losses
    assert sorted(p.name for p in (tmp_path / "split").glob("step*")) == [
        "step000000003"
    ]  # older ones pruned

    # A new process starts from the untrained student: the weights must come from the checkpoint.
    teacher, student = make_models()
    second = distill(student, teacher, batches, config, tmp_path / "split", progress=False)
    assert (second.steps_done, second.resumed_from) == (STEPS, 3)
    assert second.losses == full.losses
    for (name, a), b in zip(student.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b), name

    # Nothing left to do: the final weights are loaded, no step runs.
    teacher, student = make_models()
    again = distill(student, teacher, batches, config, tmp_path / "split", progress=False)
    assert (again.steps_done, again.resumed_from, again.losses) == (STEPS, STEPS, full.losses)
    assert max_weight_diff(student, reference) == 0.0


def test_checkpoints_kept_in_a_remote_store_resume_on_another_node(process_group, tmp_path, monkeypatch):
    """With a remote store, the checkpoints a run saves are kept there while it runs (a thread
    looking every few ms here) and when it stops; the stage restarted on a node with none of its
    files restores the last one, resumes from it and ends with the uninterrupted run's weights."""
    import uuid

    import fsspec

    from mlpfuse.core.artifacts import mirrored_state, use_state_sync
    from mlpfuse.orchestrator.store import MIRROR_ENV, ArtifactStore
    from mlpfuse.stages.model.trainer import checkpoint_files

    config = make_config()
    batches = make_batches()
    teacher, reference = make_models()
    full = distill(reference, teacher, batches, config, tmp_path / "full", progress=False)

    uri = f"memory://mlpfuse-test-{uuid.uuid4().hex}"
    monkeypatch.setenv(MIRROR_ENV, str(tmp_path / "node1"))
    sync = ArtifactStore(uri).state_sync("distill", "k")
    saved: list[str] = []

    class Recording:
        def save(self, src: Path, files: list[str]) -> None:
            sync.save(src, files)
            saved.append(files[0].split("/")[0])

        def restore(self, dest: Path) -> bool:
            return sync.restore(dest)

    teacher, student = make_models()
    ckpt = tmp_path / "node1" / "checkpoints"
    with use_state_sync(Recording()), mirrored_state(ckpt, checkpoint_files, every_s=0.005):
        distill(student, teacher, batches, config.model_copy(update={"steps": 3}), ckpt, progress=False)
    assert saved[-1] == "step000000003" and saved == sorted(set(saved))  # each new state once, in order

    monkeypatch.setenv(MIRROR_ENV, str(tmp_path / "node2"))
    teacher, student = make_models()
    ckpt = tmp_path / "node2" / "checkpoints"
    with use_state_sync(ArtifactStore(uri).state_sync("distill", "k")), mirrored_state(ckpt, checkpoint_files):
        second = distill(student, teacher, batches, config, ckpt, progress=False)
    assert (second.steps_done, second.resumed_from) == (STEPS, 3)
    assert second.losses == full.losses
    assert max_weight_diff(student, reference) == 0.0
    fsspec.filesystem("memory").rm(f"/{uri.removeprefix('memory://')}", recursive=True)


def test_resume_refuses_other_settings(process_group, tmp_path):
    batches = make_batches()
    teacher, student = make_models()
    distill(student, teacher, batches, make_config(steps=4), tmp_path, progress=False)
    with pytest.raises(InputError, match="other distill settings.*lr"):
        distill(student, teacher, batches, make_config(lr=LR / 2), tmp_path, progress=False)
    with pytest.raises(InputError, match="other batches"):
        distill(student, teacher, make_batches(n=5), make_config(), tmp_path, progress=False)
    with pytest.raises(InputError, match="more than steps=2"):
        distill(student, teacher, batches, make_config(steps=2), tmp_path, progress=False)


_CHILD = """
import os, signal, sys
from pathlib import Path
import torch
sys.path.insert(0, {tests!r})
from test_distill import make_batches, make_config, make_models
from mlpfuse.stages.model.trainer import distill

def run(checkpoint_dir, out, kill_at_forward=None):
    teacher, student = make_models()
    if kill_at_forward is not None:
        calls = [0]
        def die(module, args):
            calls[0] += 1
            if calls[0] == kill_at_forward:
                os.kill(os.getpid(), signal.SIGKILL)
        student.register_forward_pre_hook(die)
    r = distill(student, teacher, make_batches(), make_config(), Path(checkpoint_dir), progress=False)
    torch.save({{"state": student.state_dict(), "losses": r.losses, "resumed_from": r.resumed_from}}, out)

if sys.argv[1] == "kill":
    run(sys.argv[2], sys.argv[3], kill_at_forward=int(sys.argv[4]))
else:  # resume the killed run, then an uninterrupted one in the same process
    run(sys.argv[2], sys.argv[3])
    run(sys.argv[4], sys.argv[5])
"""


def test_sigkill_then_resume_in_new_process(tmp_path):
    """A process SIGKILLed mid-step; a new process (which creates and destroys its own process
    group, twice) resumes from the last complete checkpoint and ends where an uninterrupted run
    ends."""
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(tests=str(REPO / "tests")))
    # TMPDIR: the killed child cannot remove its process-group folder; keep it under tmp_path.
    (tmp_path / "tmp").mkdir()
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
        "TMPDIR": str(tmp_path / "tmp"),
    }

    def child(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(script), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    killed_dir, fresh_dir = tmp_path / "killed", tmp_path / "fresh"
    # grad_accum=2, checkpoint_every=2: forward 10 is step 5's 2nd micro-batch, after checkpoint 4.
    p = child("kill", str(killed_dir), str(tmp_path / "never.pt"), "10")
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    assert json.loads((killed_dir / PROGRESS_FILE).read_text())["steps_done"] == 4

    p = child(
        "resume",
        str(killed_dir),
        str(tmp_path / "resumed.pt"),
        str(fresh_dir),
        str(tmp_path / "fresh.pt"),
    )
    assert p.returncode == 0, p.stderr[-3000:]
    resumed = torch.load(tmp_path / "resumed.pt")
    fresh = torch.load(tmp_path / "fresh.pt")
    assert (resumed["resumed_from"], fresh["resumed_from"]) == (4, None)
    assert resumed["losses"] == fresh["losses"] and len(resumed["losses"]) == STEPS
    for name, tensor in fresh["state"].items():
        assert torch.equal(resumed["state"][name], tensor), name


# ---------------------------------------------------------------------------------------------
# Ray Train (opt-in: starts an embedded Ray on loopback)


@pytest.mark.cluster
def test_ray_train_distill_matches_local(process_group, ray_local, tmp_path):
    """One CPU Ray Train worker (file rendezvous, nothing listens beyond loopback) trains exactly
    what distill() trains in this process."""
    from mlpfuse.cluster.ray_train import ray_train_distill

    config = make_config(steps=4)
    batches = make_batches()
    teacher, student = make_models()
    got = ray_train_distill(
        student,
        teacher,
        batches,
        config,
        tmp_path / "ray",
        num_workers=1,
        use_gpu=False,
        rendezvous="file",
    )
    teacher, local = make_models()
    want = distill(local, teacher, batches, config, tmp_path / "local", progress=False)
    assert got == want
    assert student.model.layers[1].mlp is student.model.layers[0].mlp
    assert max_weight_diff(student, local) == 0.0
    assert not list((tmp_path / "ray" / ".rendezvous").iterdir())  # the store file is removed


def test_no_checkpoint_temp_files_left(process_group, tmp_path):
    teacher, student = make_models()
    distill(
        student,
        teacher,
        make_batches(),
        make_config(steps=2, checkpoint_every=1),
        tmp_path,
        progress=False,
    )
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_teacher_in_stored_precision_computes_as_in_float32():
    """A bf16 teacher upcast one unit at a time gives exactly the hidden states of the same
    weights loaded in float32, keeps its bf16 storage, and never holds more than one decoder layer
    (plus the unit being run) in float32."""
    from mlpfuse.stages.model.trainer import teacher_units, upcast_per_unit

    teacher, _ = make_models()
    low = copy.deepcopy(teacher).to(torch.bfloat16)
    ref = copy.deepcopy(low).float()
    ids = make_batches()[0]
    units = teacher_units(low)
    layers = [u for u in units if type(u).__name__.endswith("DecoderLayer")]
    assert len(layers) == low.config.num_hidden_layers
    handles = upcast_per_unit(low, units)
    fp32_seen = []
    for layer in layers:  # registered after the upcast: sees the layer as it computes
        layer.register_forward_pre_hook(lambda m, a: fp32_seen.append(
            sum(p.numel() for p in low.parameters() if p.dtype == torch.float32)))
    with torch.no_grad():
        got = low(input_ids=ids, output_hidden_states=True).hidden_states
        want = ref(input_ids=ids, output_hidden_states=True).hidden_states
    assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))
    assert all(p.dtype == torch.bfloat16 for p in low.parameters())
    assert max(fp32_seen) == max(sum(p.numel() for p in layer.parameters()) for layer in layers)
    for h in handles:
        h.remove()

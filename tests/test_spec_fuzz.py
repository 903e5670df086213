"""Hostile specs, generated: every field of a valid spec (the demo's, with every section present)
replaced by values of every JSON kind, unknown keys added, sections replaced wholesale. A spec
either validates or is refused with a SpecError (exit 2) whose message names the field; never
another exception, and validating writes nothing anywhere."""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlpfuse.orchestrator.spec import SpecError, parse_spec

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
BASE: dict[str, Any] = yaml.safe_load((EXAMPLES / "smollm2-demo.yaml").read_text())
BASE |= {
    "ray": {"address": None, "num_cpus": 2, "max_retries": 2},
    "resources": {"gpus": "auto", "precision": "auto", "stages": {"collect_part": {"cpus": 2, "gpus": 0}}},
    "collect": {"features": ["up", "gate", "hidden"], "dtype": "float16", "num_workers": 1},
    "export": {"dtype": "auto"},
    "similarity": {"tokens": 2048, "skip_positions": 0},
}


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path of the nested dicts in ``obj``."""
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.append((*prefix, k))
            out += _paths(v, (*prefix, k))
    return out


PATHS = _paths(BASE)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([-1, 0, 1e308, -0.0, math.inf]),
    st.text(max_size=12), st.sampled_from(["../..", "/etc/passwd", "~/../../x", "auto", "", "s3://", "${HOME}",
                                            "!!python/object:os.system", "1e999", "{", "{nope}", "runs/{0}", "{name.__class__}"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                      st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=6)


def _set(spec: dict, path: tuple, value: Any) -> None:
    node = spec
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(PATHS), value=values, extra=st.one_of(st.none(), st.text(min_size=1, max_size=8)))
def test_a_mutated_spec_validates_or_is_refused_naming_the_field(path: tuple, value: Any, extra: str | None) -> None:
    spec = copy.deepcopy(BASE)
    _set(spec, path, value)
    if extra is not None:  # and an unknown key beside it
        parent = spec
        for k in path[:-1]:
            parent = parent[k]
        if extra not in parent:
            parent[extra] = 1
    before = set(os.listdir("."))
    try:
        parsed = parse_spec(spec, "fuzz.yaml")
    except SpecError as e:
        msg = str(e)
        assert msg.startswith("invalid pipeline spec fuzz.yaml") or "fuzz.yaml" in msg or path[0] in msg, msg
        named = {str(p) for p in path} | ({extra} if extra else set())
        assert any(n in msg for n in named), f"{msg!r} names none of {named}"
    else:
        # What validated stays inside its folders: the output never escapes through name or output.
        out = parsed.output_dir()
        assert ".." not in Path(parsed.name).parts
        assert isinstance(out, Path)
    assert set(os.listdir(".")) == before  # validating writes nothing


@settings(max_examples=150, deadline=None)
@given(doc=values)
def test_any_document_is_a_spec_or_a_spec_error(doc: Any) -> None:
    try:
        parse_spec(doc, "doc.yaml")
    except SpecError:
        pass


@pytest.mark.parametrize("output", ["{nope}", "{", "runs/{0}", "{name.__class__}", "{name!r}", "../../etc",
                                    "runs/../../x", "runs/{name}/.."])
def test_outputs_that_escape_or_do_not_format_are_refused(output: str) -> None:
    with pytest.raises(SpecError, match="output"):
        parse_spec({**BASE, "output": output})
    assert parse_spec({**BASE, "output": "/abs/runs/{name}"}).output_dir() == Path("/abs/runs/smollm2-demo")


@pytest.mark.parametrize("name", ["..", "../x", "a/b", ".hidden", "x\x00y", "a\\b"])
def test_names_that_escape_their_folder_are_refused(name: str) -> None:
    with pytest.raises(SpecError, match="name"):
        parse_spec({**BASE, "name": name})

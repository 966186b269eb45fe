"""Flax resolves the DiT's logical axis names (``nnx.logical_axis_rules`` + ``nnx.get_partition_spec``) to
exactly the PartitionSpecs the project's own resolver gave before it was removed.

The reference is ``tests/fixtures/old_sharding_specs.json.gz``, written at commit 7288349 by
``tests/fixtures/dump_old_sharding_specs.py`` with the old ``parallel.tree_shardings`` /
``follow_param_shardings``: every parameter and every Adam moment of the tiny, 1.3B and 14B DiT (built
abstractly) and of the tiny DiT's LoRA adapters, on four meshes (FSDP, data x FSDP, with a 'tensor' axis,
and an FSDP size of 3 that the tiny model's widths do not divide). The fixture has one entry per block
(``scan_layers=False``); the stacked blocks (``scan_layers=True``) must give every block's spec behind a
leading ``None`` (the 'layers' axis, on no mesh axis).
"""

import gzip
import json
import os
import re

import jax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from experiments import dit_setup
from shelllcc import parallel
from shelllcc.models.wan_transformer import WanTransformer, get_config
from shelllcc.training import lora as lora_lib
from shelllcc.training import optimizers

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "old_sharding_specs.json.gz")
MODELS = ("tiny", "wan2.1-t2v-1.3b", "wan2.1-t2v-14b")


@pytest.fixture(scope="module")
def old():
    with gzip.open(FIXTURE, "rt") as f:
        return json.load(f)


def _meshes():
    assert jax.device_count() == 8, "tests/conftest.py forces 8 host devices"
    return {
        "data2_fsdp4": parallel.make_mesh(data=2, fsdp=4),
        "fsdp8": parallel.make_mesh(data=1, fsdp=8),
        "data2_fsdp2_tensor2": jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                                             axis_types=(jax.sharding.AxisType.Auto,) * 3),
        "fsdp3": parallel.make_mesh(data=1, fsdp=3, devices=jax.devices()[:3]),
    }


def _spec_json(spec) -> list:
    return [list(a) if isinstance(a, tuple) else a for a in spec]


def _specs(shardings) -> dict:
    return {jax.tree_util.keystr(p): _spec_json(s.spec) for p, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}


def _new_specs(state: nnx.State, mesh) -> tuple[dict, dict]:
    """Params and Adam moments of ``state`` as the training code shards them now."""
    pure = nnx.to_pure_dict(state)
    opt = optimizers.make_optimizer(optimizers.OptimizerConfig(weight_decay=0.01), pure)
    with dit_setup.sharding_context(mesh, parallel.DEFAULT_RULES):
        param_sh = dit_setup.state_shardings(state, mesh)
        opt_sh = parallel.optimizer_shardings(opt, state, mesh)
    # the shardings have the structure of the pure arrays the train state holds
    assert jax.tree.structure(param_sh) == jax.tree.structure(pure)
    assert jax.tree.structure(opt_sh) == jax.tree.structure(jax.eval_shape(opt.init, pure))
    return _specs(param_sh), _specs(opt_sh)


def _compare(old, case: str, new: dict):
    want = old["cases"][case]
    assert set(new) == set(want), case
    diff = {k: (want[k], new[k]) for k in want if want[k] != new[k]}
    assert not diff, f"{case}: {len(diff)} of {len(want)} specs differ, e.g. {list(diff.items())[:3]}"


def _compare_stacked(old, case: str, new: dict):
    """``new`` from the stacked blocks: ``['blocks']['ffn']...`` stands for every ``['blocks'][i]['ffn']...``."""
    want = old["cases"][case]
    by_stacked: dict[str, set] = {}
    for key, spec in want.items():
        stacked_key, n = re.subn(r"\['blocks'\]\[\d+\]", "['blocks']", key)
        by_stacked.setdefault(stacked_key, set()).add(json.dumps([None] + spec if n else spec))
    assert set(new) == set(by_stacked), case
    diff = {k: (by_stacked[k], new[k]) for k in new if by_stacked[k] != {json.dumps(new[k])}}
    assert not diff, f"{case} (stacked): {len(diff)} specs differ, e.g. {list(diff.items())[:3]}"
    assert any(k != s for k, s in zip(sorted(want), sorted(by_stacked)))      # blocks were there to stack


@pytest.mark.parametrize("model", MODELS)
def test_param_and_adam_specs_equal_the_old_resolver(old, model):
    states = {scan: nnx.state(nnx.eval_shape(lambda: WanTransformer(get_config(model, scan_layers=scan),
                                                                    rngs=nnx.Rngs(0))), nnx.Param)
              for scan in (False, True)}
    for mesh_name, mesh in _meshes().items():
        assert {k: int(v) for k, v in mesh.shape.items()} == old["meshes"][mesh_name]
        params, adam = _new_specs(states[False], mesh)
        _compare(old, f"{model}/{mesh_name}/params", params)
        _compare(old, f"{model}/{mesh_name}/adam", adam)
        params, adam = _new_specs(states[True], mesh)
        _compare_stacked(old, f"{model}/{mesh_name}/params", params)
        _compare_stacked(old, f"{model}/{mesh_name}/adam", adam)
    # the fixture is not trivial: FSDP, tensor and replicated specs all occur
    flat = [tuple(map(str, v)) for v in old["cases"][f"{model}/data2_fsdp2_tensor2/params"].values()]
    assert any("fsdp" in v for v in flat) and any("tensor" in v for v in flat) and any(set(v) == {"None"} for v in flat)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_lora_adapter_specs_equal_the_old_resolver(old, scan_layers):
    cfg = get_config("tiny", scan_layers=scan_layers)

    def build():
        model = WanTransformer(cfg, rngs=nnx.Rngs(0))
        lora_lib.apply_lora(model, rank=4, alpha=4.0, rngs=nnx.Rngs(1))
        return model

    state = nnx.state(nnx.eval_shape(build), lora_lib.lora_filter)
    compare = _compare_stacked if scan_layers else _compare
    for mesh_name, mesh in _meshes().items():
        params, adam = _new_specs(state, mesh)
        compare(old, f"tiny-lora/{mesh_name}/params", params)
        compare(old, f"tiny-lora/{mesh_name}/adam", adam)


def test_weights_are_born_sharded_under_the_mesh(old):
    """A model built concretely under ``sharding_context`` has its arrays placed at the resolved shardings."""
    mesh = _meshes()["data2_fsdp4"]
    with dit_setup.sharding_context(mesh, parallel.DEFAULT_RULES):
        model = WanTransformer(get_config("tiny", scan_layers=False), rngs=nnx.Rngs(0))
    got = _specs(jax.tree.map(lambda x: x.sharding, nnx.to_pure_dict(nnx.state(model, nnx.Param))))
    want = old["cases"]["tiny/data2_fsdp4/params"]
    assert got.keys() == want.keys()
    pad = lambda spec, n: spec + [None] * (n - len(spec))  # noqa: E731  (P('fsdp') places like P('fsdp', None))
    assert {k: v for k, v in got.items() if pad(v, len(want[k])) != want[k]} == {}


def test_axis_rules_and_fitting():
    mesh = parallel.make_mesh(data=2, fsdp=4)
    rules = parallel.axis_rules(parallel.DEFAULT_RULES, mesh, ("embed", "mlp", "freq"))
    # 'tensor' is no axis of this mesh: its rules resolve to replicated; names without a rule too
    assert dict(rules) == {"embed": "fsdp", "heads": None, "mlp": None, "modulation": None, "freq": None}
    # first match wins
    assert dict(parallel.axis_rules([("embed", "fsdp"), ("embed", "data")], mesh)) == {"embed": "fsdp"}
    # a typo in a rule is an error naming the rule
    with pytest.raises(ValueError, match="'mlp', 'tensr'"):
        parallel.axis_rules([("mlp", "tensr")], mesh)

    def spec(names, shape, rules):
        v = nnx.Param(jax.ShapeDtypeStruct(shape, "float32"), out_sharding=names, eager_sharding=False)
        with parallel.sharding_context(mesh, rules):
            return parallel.shardings({"v": v}, mesh)["v"].spec

    assert spec(("embed", "mlp"), (64, 128), parallel.DEFAULT_RULES) == P("fsdp", None)
    # a mesh axis is used once per array: the second 'embed' dimension stays replicated
    assert spec(("embed", "embed"), (64, 64), [("embed", "fsdp")]) == P("fsdp", None)
    # sizes that do not divide the mesh axis stay replicated (jax refuses uneven shardings)
    assert spec(("embed",), (66,), [("embed", "fsdp")]) == P(None)
    assert spec(("batch", None), (8, 3), [("batch", ("data", "fsdp"))]) == P(("data", "fsdp"), None)
    # a name without a rule stays replicated
    assert spec(("freq", "embed"), (8, 64), [("embed", "fsdp")]) == P(None, "fsdp")

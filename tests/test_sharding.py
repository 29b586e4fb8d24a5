"""Mesh construction, regex sharding rules and batch placement (single device; the 8-device
equivalence of whole train steps is in test_steps_multidevice.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from fluxflow_jax import sharding


def test_mesh_shape_resolves_minus_one_and_checks_product():
    assert sharding.mesh_shape((("data", -1),), 8) == (("data",), (8,))
    assert sharding.mesh_shape((("data", -1), ("fsdp", 4)), 8) == (("data", "fsdp"), (2, 4))
    assert sharding.mesh_shape((("data", 2), ("fsdp", 4)), 8) == (("data", "fsdp"), (2, 4))
    with pytest.raises(ValueError, match="config.mesh.*needs 6 devices, 8 are available"):
        sharding.mesh_shape((("data", 2), ("fsdp", 3)), 8)
    with pytest.raises(ValueError, match="config.mesh.*do not divide"):
        sharding.mesh_shape((("data", -1), ("fsdp", 3)), 8)
    with pytest.raises(ValueError, match="at most one axis may have size -1"):
        sharding.mesh_shape((("data", -1), ("fsdp", -1)), 8)
    with pytest.raises(ValueError, match="unknown mesh axis 'batch'"):
        sharding.mesh_shape((("batch", -1),), 8)
    with pytest.raises(ValueError, match="appears twice"):
        sharding.mesh_shape((("data", 1), ("data", -1)), 1)


def test_make_mesh_uses_auto_axes_and_all_devices():
    mesh = sharding.make_mesh()
    assert mesh.axis_names == ("data",)
    assert mesh.shape["data"] == len(jax.devices())
    assert all(t == AxisType.Auto for t in mesh.axis_types)
    assert sharding.data_axes(mesh) == ("data",)
    assert sharding.batch_sharding(mesh).spec == P("data")


def test_fsdp_spec_shards_largest_divisible_dim():
    mesh = sharding.make_mesh((("data", 1), ("fsdp", 1)))
    # An fsdp axis of size 1 shards nothing.
    assert sharding.fsdp_spec((8, 16), mesh) == P()

    class FakeMesh:  # fsdp_spec only reads mesh.shape
        def __init__(self):
            self.shape = {"data": 2, "fsdp": 4}

    fm = FakeMesh()
    assert sharding.fsdp_spec((3, 3, 8, 40), fm) == P(None, None, None, "fsdp")
    assert sharding.fsdp_spec((12, 6), fm) == P("fsdp", None)
    assert sharding.fsdp_spec((6, 3), fm) == P()          # nothing divisible by 4
    assert sharding.fsdp_spec((), fm) == P()              # scalars stay replicated
    assert sharding.fsdp_spec((2,), fm) == P()            # smaller than the axis
    assert sharding.fsdp_spec((16, 16), fm) == P(None, "fsdp")  # ties: the last dim


def test_rules_first_match_wins_and_default_replicates():
    mesh = sharding.make_mesh()
    rules = [(r"flow/.*kernel$", ("data", None)), (r"kernel$", "replicate")]
    tree = {"flow": {"dense": {"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros((3,))}},
            "vae": {"kernel": jnp.zeros((4, 3))}}
    sh = sharding.tree_shardings(tree, mesh, rules)
    assert sh["flow"]["dense"]["kernel"].spec == P("data", None)
    assert sh["flow"]["dense"]["bias"].spec == P()
    assert sh["vae"]["kernel"].spec == P()
    # Typed PRNG keys are replicated whatever the rules say.
    keyed = sharding.tree_shardings({"k": jax.random.key(0)}, mesh, [(".*", ("data",))])
    assert keyed["k"].spec == P()


def test_rule_errors_name_the_rule_and_path():
    mesh = sharding.make_mesh()
    tree = {"a": {"kernel": jnp.zeros((4,))}}
    with pytest.raises(ValueError, match=r"rule 'kernel'.*2 entries.*'a/kernel'"):
        sharding.tree_shardings(tree, mesh, [("kernel", ("data", None))])
    with pytest.raises(ValueError, match=r"axis 'fsdp' is not in the mesh"):
        sharding.tree_shardings(tree, mesh, [("kernel", ("fsdp",))])
    with pytest.raises(TypeError, match=r"spec 'shard'"):
        sharding.tree_shardings(tree, mesh, [("kernel", "shard")])
    with pytest.raises(ValueError, match=r"sharding_rules\[0\]: bad regex"):
        sharding.tree_shardings(tree, mesh, [("(", "replicate")])
    with pytest.raises(ValueError, match=r"sharding_rules\[0\] must be \(regex, spec\)"):
        sharding.check_rules([("a", "b", "c")])


def test_path_str_joins_dict_and_dataclass_paths():
    from fluxflow_jax.state import TrainState
    st = TrainState(step=jnp.zeros((), jnp.int32), params={"flow": {"k": jnp.zeros(2)}},
                    opt_state={}, ema={}, spectral={}, loss_stats={},
                    nonfinite=jnp.zeros((), jnp.int32))
    paths = [sharding.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(st)]
    assert paths == ["step", "params/flow/k", "nonfinite"]


def test_put_batch_places_rows_and_checks_divisibility():
    mesh = sharding.make_mesh()
    batch = {"image": np.arange(2 * 4 * 4 * 3, dtype=np.float32).reshape(2, 4, 4, 3),
             "input_ids": np.ones((2, 5), np.int32)}
    out = sharding.put_batch(batch, mesh)
    np.testing.assert_array_equal(np.asarray(out["image"]), batch["image"])
    assert out["image"].sharding.spec == P("data")
    assert out["input_ids"].dtype == jnp.int32
    with pytest.raises(ValueError, match=r"batch\['input_ids'\] has 3 rows"):
        sharding.put_batch({"image": batch["image"], "input_ids": np.ones((3, 5))}, mesh)
    with pytest.raises(ValueError, match="is a scalar"):
        sharding.put_batch({"x": np.float32(1.0)}, mesh)


def test_put_batch_divisibility_error_names_config_key(monkeypatch):
    # Simulate a 3-way data axis on this 1-device machine: only data_size is consulted.
    mesh = sharding.make_mesh()
    monkeypatch.setattr(sharding, "data_size", lambda m: 3)
    with pytest.raises(ValueError, match=r"config.stages.s1.batch_size: the global batch 4"):
        sharding.put_batch({"image": np.zeros((4, 2, 2, 3), np.float32)}, mesh,
                           key="stages.s1.batch_size")

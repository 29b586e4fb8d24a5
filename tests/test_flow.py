"""FluxFlowProcessor: interop, checkpoint layout, time mapping, grids, gradients, variants."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from parity_utils import parity_dir
from run_utils import USER_LEVEL

from fluxflow_jax.interop.common import InteropError, count_params
from fluxflow_jax.interop.flow import (
    flow_from_torch,
    flow_rule,
    flow_template,
    flow_to_torch,
    infer_flow_config,
)
from fluxflow_jax.models.flow import FluxFlowProcessor, rope_inv_freq, time_index, valid_grid

TINY = {"d_model": 16, "vae_dim": 8, "embedding_size": 12, "n_head": 2, "n_layers": 2}
PHASE1 = {"d_model": 128, "vae_dim": 128, "embedding_size": 1024, "n_head": 8, "n_layers": 10}
PHASE1_PARAMS = 5_373_824  # REFERENCE.md section 1.9
MAX_HW = 1024


def _inputs(b=2, grid=(2, 3), n_tok=None, seed=0, cfg=TINY):
    """Random tokens + an HW token encoding ``grid`` (its other channels nonzero), text, t.

    numpy randomness: eager ``jax.random`` would compile its own kernels on a slow CPU.
    """
    rng = np.random.default_rng(seed)
    h, w = grid
    n_tok = h * w if n_tok is None else n_tok
    d = cfg["vae_dim"]
    hw = np.full((b, 1, d), 0.37, np.float32)
    hw[:, :, 0], hw[:, :, 1] = h / MAX_HW, w / MAX_HW
    packed = np.concatenate([rng.standard_normal((b, n_tok, d)).astype(np.float32), hw], axis=1)
    emb = rng.standard_normal((b, cfg["embedding_size"])).astype(np.float32)
    t = rng.uniform(size=(b,)).astype(np.float32)
    return jnp.asarray(packed), jnp.asarray(emb), jnp.asarray(t)


def _random_variables(cfg, seed=1, scale=0.3):
    """Every leaf random (no init constants that could hide a layout mistake), without running
    ``init`` (compiling the initialisers costs tens of seconds here)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (scale * rng.standard_normal(s.shape)).astype(np.float32),
                        flow_template(cfg))


# jit is used only where it is the point of a test: on a 2-core CPU a jit compile of this model
# costs more than many eager calls, whose per-primitive kernels are cached across tests.
_fwd = jax.jit(lambda model, v, p, e, t, hw: model.apply(v, p, e, t, hw=hw), static_argnums=(0, 5))


@pytest.fixture(scope="module")
def tiny():
    return FluxFlowProcessor(**TINY), _random_variables(TINY)


def _flat_equal(a, b):
    fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    assert set(fa) == set(fb)
    for p in fa:
        np.testing.assert_array_equal(np.asarray(fa[p]), np.asarray(fb[p]), err_msg="/".join(p))


# ---------------------------------------------------------------------------------- interop


def test_export_import_roundtrip_is_bit_identical(tiny):
    _, variables = tiny
    sd = flow_to_torch(variables, TINY)
    assert all(v.dtype == np.float32 for v in sd.values())
    back, cfg = flow_from_torch(sd)
    assert {k: cfg[k] for k in TINY} == TINY
    _flat_equal(back, variables)
    sd2 = flow_to_torch(back, cfg)
    assert sorted(sd2) == sorted(sd)
    for k in sd:
        np.testing.assert_array_equal(sd2[k], sd[k], err_msg=k)


def test_export_layouts_and_inv_freq(tiny):
    _, variables = tiny
    sd = flow_to_torch(variables, TINY, prefix="flow_processor.")
    p = variables["params"]
    np.testing.assert_array_equal(sd["flow_processor.vae_to_dmodel.weight"],
                                  p["vae_to_dmodel"]["kernel"].T)
    np.testing.assert_array_equal(sd["flow_processor.flow_predictor.0.weight"],
                                  np.transpose(p["flow_predictor_0"]["kernel"], (3, 2, 0, 1)))
    assert sd["flow_processor.context_final.1.p2"].shape == (16, 1, 1)
    assert sd["flow_processor.time_embed.2.p2"].shape == (16,)
    assert sd["flow_processor.transformer_blocks.1.p3.2.0.weight"].shape == (16, 16)
    assert sd["flow_processor.transformer_blocks.0.self_attn.kv_proj.weight"].shape == (32, 16)
    for k in range(TINY["n_layers"]):
        inv = sd[f"flow_processor.transformer_blocks.{k}.rotary_pe.inv_freq"]
        assert inv.dtype == np.float32 and inv.shape == (4,)  # head dim 8 -> 4 frequencies
        np.testing.assert_allclose(inv, 10000.0 ** (-np.arange(4) / 4), rtol=1e-6)


def test_inv_freq_matches_reference_fixture_buffer():
    from safetensors.numpy import load_file
    w = load_file(str(parity_dir() / "flow_processor" / "weights.safetensors"))
    ref = w["transformer_blocks.0.rotary_pe.inv_freq"]
    np.testing.assert_array_equal(rope_inv_freq(2 * ref.shape[0]), ref)


def test_manifest_phase1_keys_and_shapes():
    """An export at the Phase 1 size has exactly the reference checkpoint's flow keys and shapes."""
    path = parity_dir() / "manifest_phase1" / "flxflow_final.keys.json"
    manifest = json.loads(path.read_text())
    prefix = "diffuser.flow_processor."
    want = {k: tuple(s) for k, s in manifest["keys"].items() if k.startswith(prefix)}
    assert want, "manifest has no flow_processor keys"
    template = flow_template(PHASE1)
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), template)
    sd = flow_to_torch(zeros, PHASE1, prefix=prefix)
    got = {k: tuple(v.shape) for k, v in sd.items()}
    assert sorted(set(want) - set(got)) == [] and sorted(set(got) - set(want)) == []
    assert {k: got[k] for k in want} == want
    assert sum(k.endswith("rotary_pe.inv_freq") for k in got) == PHASE1["n_layers"]
    # and the manifest's own config infers back to the same model
    fake = {k: np.zeros(s, np.float32) for k, s in want.items()}
    cfg = infer_flow_config(fake, prefix=prefix)
    assert {k: cfg[k] for k in PHASE1} == PHASE1


def test_phase1_parameter_count():
    assert count_params(flow_template(PHASE1)) == PHASE1_PARAMS
    assert "batch_stats" not in flow_template(PHASE1)  # inv_freq is not a variable at all


def test_import_reports_wrong_shape_and_missing_key_together(tiny):
    _, variables = tiny
    sd = flow_to_torch(variables, TINY)
    del sd["transformer_blocks.1.p2.1.0.bias"]
    sd["text_proj.weight"] = np.zeros((16, 13), np.float32)
    sd["transformer_blocks.0.norm9.weight"] = np.zeros((16,), np.float32)
    with pytest.raises(InteropError) as e:
        flow_from_torch(sd, TINY)
    msg = str(e.value)
    assert "transformer_blocks.1.p2.1.0.bias" in msg and "missing" in msg
    assert "text_proj.weight" in msg and "[16, 13]" in msg and "[16, 12]" in msg
    assert "transformer_blocks.0.norm9.weight" in msg and "unexpected" in msg


def test_import_rejects_inv_freq_of_another_head_count(tiny):
    _, variables = tiny
    sd = flow_to_torch(variables, TINY)
    sd["transformer_blocks.1.rotary_pe.inv_freq"] = rope_inv_freq(4)  # as if n_head=4
    with pytest.raises(InteropError, match=r"transformer_blocks\.1\.rotary_pe\.inv_freq"):
        flow_from_torch(sd, TINY)
    # absent buffers are fine (they are derived from the config)
    sd = {k: v for k, v in flow_to_torch(variables, TINY).items() if "inv_freq" not in k}
    back, _ = flow_from_torch(sd, TINY)
    _flat_equal(back, variables)


def test_flow_rule_refuses_unknown_variables():
    with pytest.raises(InteropError, match="no reference key"):
        flow_rule(("params", "transformer_blocks_0", "mystery", "kernel"))


# ---------------------------------------------------------------------------------- behaviour


def test_time_index_mapping():
    t = jnp.array([0.0, 1.0, 0.5, 0.1, -0.3, 1.7, 0.999999])
    np.testing.assert_array_equal(np.asarray(time_index(t)), [0, 999, 499, 99, 0, 999, 998])


def test_time_embedding_uses_the_index(tiny):
    """t values with the same index give the same output; a different index changes it."""
    model, variables = tiny
    packed, emb, _ = _inputs()
    a = model.apply(variables, packed, emb, jnp.array([0.5, 0.5]), hw=(2, 3))
    b = model.apply(variables, packed, emb, jnp.array([0.5004, 0.5004]), hw=(2, 3))  # 499.6 -> 499
    c = model.apply(variables, packed, emb, jnp.array([0.51, 0.51]), hw=(2, 3))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(jnp.abs(a - c).max()) > 1e-4


def test_hw_token_passes_through_and_grid_is_read_from_it(tiny):
    model, variables = tiny
    packed, emb, t = _inputs()
    out = model.apply(variables, packed, emb, t)  # grid read from the HW token: 2x3
    assert out.shape == packed.shape
    np.testing.assert_array_equal(np.asarray(out[:, -1]), np.asarray(packed[:, -1]))
    assert float(jnp.abs(out[:, :-1] - packed[:, :-1]).max()) > 1e-3
    np.testing.assert_array_equal(np.asarray(out), np.asarray(model.apply(variables, packed, emb, t,
                                                                          hw=(2, 3))))


def test_jit_with_static_hw_and_clear_error_without(tiny):
    model, variables = tiny
    packed, emb, t = _inputs()
    eager = model.apply(variables, packed, emb, t, hw=(2, 3))
    jitted = _fwd(model, variables, packed, emb, t, (2, 3))
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"pass hw=\(h, w\)"):
        jax.jit(model.apply)(variables, packed, emb, t)


def test_rectangular_grids_batch_one_and_mixed_batch(tiny):
    """2x3 vs 3x2 maps, batch 1, and a batch whose samples have different grids (the
    reference's per-sample slow path) agreeing with per-sample runs."""
    model, variables = tiny
    packed, emb, t = _inputs()
    packed = packed.at[1, -1, :2].set(jnp.array([3.0, 2.0]) / MAX_HW)  # sample 1: a 3x2 map
    both = model.apply(variables, packed, emb, t)
    singles = {}
    for i, grid in enumerate([(2, 3), (3, 2)]):
        one = model.apply(variables, packed[i:i + 1], emb[i:i + 1], t[i:i + 1], hw=grid)
        assert one.shape == (1, 7, TINY["vae_dim"])
        np.testing.assert_allclose(np.asarray(both[i:i + 1]), np.asarray(one), rtol=1e-5, atol=1e-6)
        singles[grid] = one
    # Sample 0 read as a 3x2 map instead: the trunk is identical, only the head's update differs,
    # and it is one vector added to exactly the first ctx_tokens=4 tokens.
    transposed = model.apply(variables, packed[:1], emb[:1], t[:1], hw=(3, 2))
    diff = np.asarray(transposed - singles[(2, 3)])[0]
    assert np.abs(diff[:4]).max() > 1e-5
    np.testing.assert_allclose(diff[:4], np.broadcast_to(diff[0], diff[:4].shape), atol=1e-6)
    np.testing.assert_array_equal(diff[4:], 0.0)


def test_fewer_tokens_than_the_grid_uses_the_largest_full_map(tiny):
    """HW token says 3x3 but only 6 tokens: the head sees a 2x3 map (section 10 item 23; the
    reference would crash whenever floor(sqrt(t))*(t//floor(sqrt(t))) != t)."""
    assert valid_grid(3, 3, 7) == (2, 3, 7)
    assert valid_grid(4, 4, 16) == (4, 4, 16)
    assert valid_grid(2, 3, 9) == (2, 3, 6)
    model, variables = tiny
    packed, emb, t = _inputs()
    packed = packed.at[:, -1, :2].set(3.0 / MAX_HW)
    a = model.apply(variables, packed, emb, t)
    b = model.apply(variables, packed, emb, t, hw=(2, 3))
    np.testing.assert_array_equal(np.asarray(a[:, :-1]), np.asarray(b[:, :-1]))


def _loss(model, variables, packed, emb, t):
    return jnp.mean(model.apply(variables, packed, emb, t, hw=(2, 3))[:, :-1] ** 2)


# The text sequence is a single token, so cross-attention softmaxes over one key: its query
# projection gets exactly zero gradient in the reference as well.
STRUCTURALLY_ZERO = {f"transformer_blocks_{k}/cross_attn/q_proj/{leaf}"
                     for k in range(TINY["n_layers"]) for leaf in ("kernel", "bias")}


def test_gradients_finite_nonzero_and_identical_under_remat(tiny):
    model, variables = tiny
    packed, emb, t = _inputs()
    loss, grads = jax.jit(jax.value_and_grad(lambda v: _loss(model, v, packed, emb, t)))(variables)
    flat = {"/".join(p[1:]): np.asarray(g) for p, g in traverse_util.flatten_dict(grads).items()}
    for name, g in flat.items():
        assert np.all(np.isfinite(g)), name
        if name in STRUCTURALLY_ZERO:
            assert not np.any(g), name
        else:
            assert np.any(g != 0), f"zero gradient for {name}"
    # remat=True: same variable tree, same loss, same gradients
    rm = model.clone(remat=True)
    packed1 = jnp.zeros((1, 7, TINY["vae_dim"]))
    assert jax.tree.structure(jax.eval_shape(lambda: rm.init(
        jax.random.key(0), packed1, emb[:1], t[:1], hw=(2, 3)))) == jax.tree.structure(variables)
    loss_rm, grads_rm = jax.jit(jax.value_and_grad(
        lambda v: _loss(rm, v, packed, emb, t)))(variables)
    np.testing.assert_allclose(float(loss_rm), float(loss), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_rm)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def _plain_attention(q, k, v):
    """Softmax attention left to autodiff: the reference the tests below hold ours to."""
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k) * q.shape[-1] ** -0.5
    w = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bhkd->bhqd", w, v)


def test_one_key_cross_attention_equals_the_full_softmax_attention():
    """With one key, ParallelAttention skips q, RoPE and the softmax (the weights are exactly 1);
    its output and every gradient equal the full attention written out here."""
    from fluxflow_jax.models.conditioning import merge_heads, split_heads
    from fluxflow_jax.models.flow import ParallelAttention, apply_rope, rope_tables

    d, heads = 16, 2
    rng = np.random.default_rng(3)
    x_q = jnp.asarray(rng.standard_normal((2, 6, d)), jnp.float32)
    x_kv = jnp.asarray(rng.standard_normal((2, 1, d)), jnp.float32)
    rope_q, rope_k = rope_tables(6, d // heads), rope_tables(1, d // heads)
    attn = ParallelAttention(d, heads)
    params = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), jnp.float32),
                          jax.eval_shape(lambda: attn.init(jax.random.key(0), x_q, x_kv, rope_q,
                                                           rope_k))["params"])
    assert sorted(params) == ["kv_proj", "out_proj", "q_proj"]

    def full(p, x_q, x_kv):
        dense = lambda n, x: x @ p[n]["kernel"] + p[n]["bias"]
        kv = dense("kv_proj", x_kv)
        q = apply_rope(split_heads(dense("q_proj", x_q), heads), *rope_q)
        k = apply_rope(split_heads(kv[..., :d], heads), *rope_k)
        out = _plain_attention(q, k, split_heads(kv[..., d:], heads))
        return dense("out_proj", merge_heads(out))

    def loss(f):
        return lambda p, x_q, x_kv: jnp.sum(jnp.sin(f(p, x_q, x_kv)))

    ours = lambda p, x_q, x_kv: attn.apply({"params": p}, x_q, x_kv, rope_q, rope_k)
    np.testing.assert_allclose(ours(params, x_q, x_kv), full(params, x_q, x_kv), rtol=1e-6,
                               atol=1e-6)
    g_ours = jax.grad(loss(ours), argnums=(0, 1, 2))(params, x_q, x_kv)
    g_full = jax.grad(loss(full), argnums=(0, 1, 2))(params, x_q, x_kv)
    for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_full)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # the query side gets exactly zero gradient either way; the values do not
    assert not np.any(g_ours[0]["q_proj"]["kernel"]) and not np.any(g_full[0]["q_proj"]["kernel"])
    assert not np.any(g_ours[1]) and np.any(g_ours[2])


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
def test_attention_backward_equals_autodiff_of_the_softmax(dtype, tol):
    """dot_product_attention's written-out backward (rowsum(dO * O) instead of rowsum(dP * P))
    gives autodiff's gradients, computed in fp32 from the same inputs, to within ``tol`` of the
    gradient's scale (bf16: its own rounding, as autodiff's bf16 gradients have); its forward is
    autodiff's forward bit for bit."""
    from fluxflow_jax.models.conditioning import dot_product_attention

    rng = np.random.default_rng(4)
    q, k, v, g = (jnp.asarray(2 * rng.standard_normal((2, 3, 5, 4)), dtype) for _ in range(4))
    k, v = k[:, :, :4], v[:, :, :4]  # fewer keys than queries
    assert jnp.array_equal(dot_product_attention(q, k, v), _plain_attention(q, k, v))
    loss = lambda f: lambda q, k, v: jnp.sum((f(q, k, v) * g.astype(q.dtype)).astype(jnp.float32))
    grad = lambda f: jax.jit(jax.grad(loss(f), argnums=(0, 1, 2)), compiler_options=USER_LEVEL)
    ours = grad(dot_product_attention)(q, k, v)
    exact = grad(_plain_attention)(*(x.astype(jnp.float32) for x in (q, k, v)))
    for a, b in zip(ours, exact):
        assert a.dtype == dtype
        err = float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)))
        assert err <= tol * float(jnp.max(jnp.abs(b))), (err, float(jnp.max(jnp.abs(b))))


def test_initialisers_follow_the_reference():
    """Section 1.10: xavier + zero bias inside blocks/mixer/attention, torch default elsewhere,
    Embedding N(0, 1), LayerNorm ones/zeros, zero CLS, TrainableBezier constants."""
    cfg = {**TINY, "n_layers": 1}
    packed, emb, t = _inputs()
    p = FluxFlowProcessor(**cfg).init(jax.random.key(0), packed, emb, t, hw=(2, 3))["params"]
    d, e = cfg["d_model"], cfg["embedding_size"]

    def bound_ok(x, bound):
        x = np.asarray(x)
        assert np.abs(x).max() <= bound and np.abs(x).max() > 0.5 * bound

    xavier = lambda fi, fo: np.sqrt(6.0 / (fi + fo))
    blk = p["transformer_blocks_0"]
    bound_ok(blk["self_attn"]["kv_proj"]["kernel"], xavier(d, 2 * d))
    bound_ok(blk["p2"]["l1"]["kernel"], xavier(d, d))
    bound_ok(blk["ffn"]["kernel"], xavier(d, d))
    bound_ok(p["ctx_mixer"]["q_proj"]["kernel"], xavier(d, d))
    for leaf in (blk["self_attn"]["kv_proj"]["bias"], blk["p0"]["l2"]["bias"], blk["ffn"]["bias"],
                 p["ctx_mixer"]["out_proj"]["bias"], p["ctx_mixer"]["cls"]):
        assert not np.any(np.asarray(leaf))
    bound_ok(p["text_proj"]["kernel"], 1 / np.sqrt(e))
    bound_ok(p["text_proj"]["bias"], 1 / np.sqrt(e))
    bound_ok(p["context_injection"]["gate"]["bias"], 1 / np.sqrt(d))
    bound_ok(p["flow_predictor_0"]["kernel"], 1 / np.sqrt(d * 25))
    bound_ok(p["context_final_0"]["bias"], 1 / np.sqrt((d + 2) * 49))
    emb_w = np.asarray(p["time_embed_0"]["embedding"])
    assert emb_w.shape == (1000, d) and abs(emb_w.std() - 1.0) < 0.05 and abs(emb_w.mean()) < 0.05
    np.testing.assert_array_equal(p["time_embed_1"]["scale"], np.ones(d))
    np.testing.assert_array_equal(blk["norm2"]["bias"], np.zeros(d))
    for site in ("time_embed_2", "flow_predictor_1", "context_final_1"):
        for i, v in enumerate((1e-8, 0.25, 0.75, 1.0)):
            np.testing.assert_array_equal(p[site][f"p{i}"], np.full((d,), v, np.float32))


def test_bf16_compute_keeps_hw_token_and_fp32_params(tiny):
    model, variables = tiny
    packed, emb, t = _inputs()
    out = _fwd(model.clone(dtype=jnp.bfloat16), variables, packed, emb, t, (2, 3))
    ref = model.apply(variables, packed, emb, t, hw=(2, 3))
    assert out.dtype == packed.dtype
    np.testing.assert_array_equal(np.asarray(out[:, -1]), np.asarray(packed[:, -1]))
    assert float(jnp.abs(out - ref).max()) < 0.1 * max(1.0, float(jnp.abs(ref).max()))


def test_activation_ablation_builds_runs_with_fewer_params(tiny):
    base_model, base_vars = tiny
    packed, emb, t = _inputs()
    # the ablations share every weight but the Bezier control points
    shared = {"params": {k: v for k, v in base_vars["params"].items()
                         if k not in ("time_embed_2", "flow_predictor_1", "context_final_1")}}
    outs = {}
    for act in ("relu", "silu", "gelu"):
        model = base_model.clone(activation=act)
        template = jax.eval_shape(
            lambda m=model: m.init(jax.random.key(0), packed, emb, t, hw=(2, 3)))
        assert jax.tree.structure(template) == jax.tree.structure(shared)
        # each Bezier site (time_embed, flow_predictor, context_final) loses its 4 x D points
        assert count_params(template) == count_params(base_vars) - 3 * 4 * TINY["d_model"]
        out = model.apply(shared, packed, emb, t, hw=(2, 3))
        assert out.shape == packed.shape and bool(jnp.all(jnp.isfinite(out)))
        np.testing.assert_array_equal(np.asarray(out[:, -1]), np.asarray(packed[:, -1]))
        outs[act] = np.asarray(out)
        with pytest.raises(ValueError, match="no reference checkpoint layout"):
            flow_to_torch(shared, {**TINY, "activation": act})
    assert np.abs(outs["relu"] - outs["gelu"]).max() > 1e-5
    assert np.abs(outs["silu"] - outs["gelu"]).max() > 1e-5


def test_bad_activation_and_head_config_are_rejected():
    packed, emb, t = _inputs()
    with pytest.raises(ValueError, match="activation must be one of"):
        FluxFlowProcessor(**TINY, activation="tanhh").init(
            jax.random.key(0), packed, emb, t, hw=(2, 3))
    with pytest.raises(ValueError, match="not divisible by n_head"):
        FluxFlowProcessor(**{**TINY, "n_head": 3}).init(
            jax.random.key(0), packed, emb, t, hw=(2, 3))

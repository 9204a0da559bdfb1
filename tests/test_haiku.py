"""jaxmps.haiku modules: each matches Haiku's own module with the same parameters (outputs,
gradients, BatchNorm's moving averages), matches the jnp reference for the parameter-free
norms, trains every parameter, and works inside hk.transform + jax.jit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

hk = pytest.importorskip("haiku")

import jaxmps  # noqa: E402
import jaxmps.haiku as H  # noqa: E402

from layer_helpers import C, KEY, close, image, shapes, trees_close, weighted_sum  # noqa: E402


def _nchw(x):
    return jnp.transpose(x, (0, 3, 1, 2))


# (ours, haiku's, input transform for haiku's module)
PAIRS = {
    "instance_norm": (lambda: H.InstanceNorm(True, True, eps=1e-3),
                      lambda: hk.InstanceNorm(True, True, eps=1e-3), None),
    "instance_norm_nchw": (lambda: H.InstanceNorm(True, True, data_format="channels_first"),
                           lambda: hk.InstanceNorm(True, True, data_format="channels_first"),
                           None),
    "conv2d": (lambda: H.Conv2D(6, 3), lambda: hk.Conv2D(6, 3), None),
    "conv2d_strided_dilated": (lambda: H.Conv2D(6, (4, 3), stride=2, rate=(1, 2)),
                               lambda: hk.Conv2D(6, (4, 3), stride=2, rate=(1, 2)), None),
    "conv2d_valid_grouped_nchw": (
        lambda: H.Conv2D(6, 2, padding="VALID", feature_group_count=2, data_format="NCHW"),
        lambda: hk.Conv2D(6, 2, padding="VALID", feature_group_count=2, data_format="NCHW"),
        None),
    "conv2d_transpose": (lambda: H.Conv2DTranspose(5, 3, stride=2),
                         lambda: hk.Conv2DTranspose(5, 3, stride=2), None),
    "conv2d_transpose_valid_nchw": (
        lambda: H.Conv2DTranspose(5, (3, 2), stride=(2, 3), padding="VALID",
                                  data_format="NCHW"),
        lambda: hk.Conv2DTranspose(5, (3, 2), stride=(2, 3), padding="VALID",
                                   data_format="NCHW"), None),
    "conv2d_transpose_output_shape": (
        lambda: H.Conv2DTranspose(5, 3, stride=2, output_shape=(11, 10)),
        lambda: hk.Conv2DTranspose(5, 3, stride=2, output_shape=(11, 10)), None),
    "linear": (lambda: H.Linear(7), lambda: hk.Linear(7),
               lambda x: x.reshape(x.shape[0], -1)),
}


@pytest.mark.parametrize("name", PAIRS)
def test_matches_haiku(name):
    make_ours, make_theirs, reshape = PAIRS[name]
    reshape = reshape or (lambda x: x)
    x = image()
    if "nchw" in name:
        x = _nchw(x)
    ours = hk.without_apply_rng(hk.transform(lambda x: make_ours()(x)))
    theirs = hk.without_apply_rng(hk.transform(lambda x: make_theirs()(reshape(x))))
    params = theirs.init(KEY, x)
    assert shapes(ours.init(KEY, x)) == shapes(params)  # same names and shapes
    # non-trivial offsets and biases (Haiku starts them at zero)
    params = jax.tree.map(lambda p: p + 0.1 * jnp.arange(p.size).reshape(p.shape) / p.size,
                          params)

    def outputs_and_grads(model):
        def loss(params, x):
            y = model.apply(params, x)
            return weighted_sum(y)

        return jax.jit(lambda p, x: (model.apply(p, x), jax.grad(loss, (0, 1))(p, x)))(
            params, x)

    y_ours, g_ours = outputs_and_grads(ours)
    y_theirs, g_theirs = outputs_and_grads(theirs)
    close(y_ours, y_theirs)
    trees_close(g_ours, g_theirs)
    for path, g in jax.tree_util.tree_leaves_with_path(g_ours[0]):  # every parameter trains
        assert float(jnp.max(jnp.abs(g))) > 0, jax.tree_util.keystr(path)


def _batch_norm_model(module, **call):
    def forward(x, is_training):
        return module()(x, is_training, **call)

    return hk.without_apply_rng(hk.transform_with_state(forward))


@pytest.mark.parametrize("shape", [(2, 6, 5, C), (6, C)])
def test_batch_norm_matches_haiku_moving_averages_and_eval(shape):
    ours = _batch_norm_model(lambda: H.BatchNorm(True, True, decay_rate=0.8, eps=1e-3))
    theirs = _batch_norm_model(lambda: hk.BatchNorm(True, True, decay_rate=0.8, eps=1e-3))
    x = image(shape)
    params, state = theirs.init(KEY, x, True)
    o_params, o_state = ours.init(KEY, x, True)
    assert (shapes(o_params), shapes(o_state)) == (shapes(params), shapes(state))
    params = jax.tree.map(lambda p: p + jnp.linspace(-0.5, 0.5, p.size).reshape(p.shape),
                          params)
    apply_ours = jax.jit(ours.apply, static_argnums=3)
    s_ours, s_theirs = state, state
    for i in range(2):
        xi = x * (1 + i) + i
        y, s_ours = apply_ours(params, s_ours, xi, True)
        y_hk, s_theirs = theirs.apply(params, s_theirs, xi, True)
        close(y, y_hk)
        trees_close(s_ours, s_theirs)
    # the documented update: zero-debiased EMA of the batch mean and biased variance; after
    # one step it is the batch statistic itself
    _, one = ours.apply(params, state, x, True)
    xn = np.asarray(x, np.float64)
    axes = tuple(range(x.ndim - 1))
    average = {k.split("/")[-1]: v["average"].reshape(-1) for k, v in one.items()}
    np.testing.assert_allclose(average["mean_ema"], xn.mean(axes), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(average["var_ema"], xn.var(axes), rtol=1e-5, atol=1e-5)
    # inference on the moving averages, and with local statistics
    for kwargs in ({}, {"test_local_stats": True}):
        ours_eval = _batch_norm_model(lambda: H.BatchNorm(True, True, 0.8, eps=1e-3), **kwargs)
        theirs_eval = _batch_norm_model(lambda: hk.BatchNorm(True, True, 0.8, eps=1e-3),
                                        **kwargs)
        y, s_after = ours_eval.apply(params, s_ours, x + 3, False)
        close(y, theirs_eval.apply(params, s_theirs, x + 3, False)[0])
        trees_close(s_after, s_ours)  # not training: the averages stay

    def loss(params, x):
        y, _ = ours.apply(params, state, x, True)
        return weighted_sum(y)

    def loss_hk(params, x):
        y, _ = theirs.apply(params, state, x, True)
        return weighted_sum(y)

    trees_close(jax.grad(loss, (0, 1))(params, x), jax.grad(loss_hk, (0, 1))(params, x))


def test_batch_norm_scale_and_offset_given_at_call_time():
    scale, offset = jnp.linspace(0.5, 2, C), jnp.linspace(-1, 1, C)
    model = _batch_norm_model(lambda: H.BatchNorm(False, False, 0.9), scale=scale,
                              offset=offset)
    x = image()
    params, state = model.init(KEY, x, True)
    assert params == {}
    y, _ = model.apply(params, state, x, True)
    expected, _ = jaxmps.batch_norm(x, scale, offset, implementation="reference")
    close(y, expected)


def test_batch_norm_cross_replica_axis():
    model = _batch_norm_model(lambda: H.BatchNorm(True, True, 0.9, cross_replica_axis="r"))
    whole_model = _batch_norm_model(lambda: H.BatchNorm(True, True, 0.9))
    x = image((4, 3, 2, C))
    params, state = whole_model.init(KEY, x, True)
    whole, whole_state = whole_model.apply(params, state, x, True)
    y, shard_state = jax.vmap(lambda xs: model.apply(params, state, xs, True),
                              axis_name="r")(x.reshape(2, 2, 3, 2, C))
    close(y.reshape(x.shape), whole)
    trees_close(jax.tree.map(lambda s: s[0], shard_state), whole_state)


WINDOW_NORMS = {
    "spatial_norm": (dict(kernel_size=(3, 2), alpha=0.7, beta=0.75, delta=1.5),
                     jaxmps.spatial_norm, H.SpatialNorm),
    "local_contrast_norm": (dict(kernel_size=3, alpha=0.9, beta=0.6, delta=0.25, p0=0.8,
                                 pm=0.1, ps=1.3), jaxmps.local_contrast_norm,
                            H.LocalContrastNorm),
    "cross_channel_norm": (dict(kernel_size=3, alpha=0.8, beta=0.75, delta=1.25),
                           jaxmps.cross_channel_norm, H.CrossChannelNorm),
}


@pytest.mark.parametrize("name", WINDOW_NORMS)
def test_window_norms_match_reference(name):
    settings, function, cls = WINDOW_NORMS[name]
    x = _nchw(image())
    model = hk.without_apply_rng(hk.transform(
        lambda x: cls(**settings, data_format="channels_first")(x)))
    assert model.init(KEY, x) == {}
    expected = function(x, **settings, data_format="NCHW", implementation="reference")
    close(jax.jit(model.apply)({}, x), expected)
    g = jax.grad(lambda x: jnp.sum(jnp.sin(model.apply({}, x))))(x)
    g_ref = jax.grad(lambda x: jnp.sum(jnp.sin(function(
        x, **settings, data_format="NCHW", implementation="reference"))))(x)
    close(g, g_ref)


def test_implementation_passes_through():
    x = image()

    def net(impl):
        def forward(x):
            x = H.Conv2D(5, 3, stride=2, implementation=impl)(x)
            x = H.InstanceNorm(True, True, implementation=impl)(x)
            return H.Dense(3, implementation=impl)(x)
        return hk.without_apply_rng(hk.transform(forward))

    params = net(None).init(KEY, x)
    close(jax.jit(net(None).apply)(params, x), net("reference").apply(params, x))
    with pytest.raises(ValueError, match="implementation must be one of"):
        net("fast").apply(params, x)


def test_errors_name_the_module():
    x = image()
    with pytest.raises(ValueError, match=r"jaxmps.haiku.InstanceNorm: data_format must"):
        hk.transform(lambda x: H.InstanceNorm(True, True, data_format="HWC")(x)).init(KEY, x)
    with pytest.raises(ValueError, match=r"jaxmps.haiku.BatchNorm: scale_init must be None"):
        hk.transform(lambda x: H.BatchNorm(False, True, 0.9, scale_init=jnp.ones)(x, True)
                     ).init(KEY, x)
    with pytest.raises(ValueError, match=r"jaxmps.haiku.Conv2DTranspose: padding must be"):
        hk.transform(lambda x: H.Conv2DTranspose(3, 3, output_shape=(4, 4),
                                                 padding=((1, 1), (1, 1)))(x)).init(KEY, x)

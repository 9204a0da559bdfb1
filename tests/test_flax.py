"""jaxmps.flax.linen and jaxmps.flax.nnx layers: each matches its functional op and the jnp
reference, matches Flax's own module where the semantics coincide (same parameters in, same
outputs, gradients and running statistics out), trains every parameter, and works under jit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

flax = pytest.importorskip("flax")
import flax.linen as nn  # noqa: E402
from flax import nnx  # noqa: E402

import jaxmps  # noqa: E402
from jaxmps.flax import linen as L  # noqa: E402
from jaxmps.flax import nnx as N  # noqa: E402

from layer_helpers import C, KEY, close, image, shapes, trees_close, weighted_sum  # noqa: E402



# ---- linen: the same variables in our module and Flax's give the same results ---------------

LINEN_PAIRS = {
    "instance_norm": (lambda: L.InstanceNorm(epsilon=1e-3),
                      lambda: nn.InstanceNorm(epsilon=1e-3)),
    "conv": (lambda: L.Conv(6, (3, 3)), lambda: nn.Conv(6, (3, 3))),
    "conv_strided_even": (lambda: L.Conv(6, (4, 3), strides=2, kernel_dilation=(1, 2)),
                          lambda: nn.Conv(6, (4, 3), strides=2, kernel_dilation=(1, 2))),
    "conv_valid_grouped": (lambda: L.Conv(6, (2, 3), padding="VALID", feature_group_count=2),
                           lambda: nn.Conv(6, (2, 3), padding="VALID", feature_group_count=2)),
    "conv_explicit_pads": (lambda: L.Conv(3, (3, 3), padding=((0, 2), (1, 0)), use_bias=False),
                           lambda: nn.Conv(3, (3, 3), padding=((0, 2), (1, 0)),
                                           use_bias=False)),
    "conv_transpose": (lambda: L.ConvTranspose(5, (3, 3), strides=2),
                       lambda: nn.ConvTranspose(5, (3, 3), strides=2)),
    "conv_transpose_valid_flipped": (
        lambda: L.ConvTranspose(5, (3, 2), strides=(2, 3), padding="VALID",
                                transpose_kernel=True),
        lambda: nn.ConvTranspose(5, (3, 2), strides=(2, 3), padding="VALID",
                                 transpose_kernel=True)),
    "dense": (lambda: L.Dense(7), lambda: nn.Dense(7)),
}


def _linen_input(name, x):
    # flax's Dense works on the last axis; ours reads the whole image (MPS fully connected).
    return x.reshape(x.shape[0], -1) if name == "dense" else x


@pytest.mark.parametrize("name", LINEN_PAIRS)
def test_linen_matches_flax(name):
    ours, theirs = (f() for f in LINEN_PAIRS[name])
    x = image()
    variables = theirs.init(KEY, _linen_input(name, x))
    assert shapes(ours.init(KEY, x)) == shapes(variables)  # same names and shapes

    def outputs_and_grads(module, x):
        def loss(variables, x):
            y = module.apply(variables, x)
            return weighted_sum(y)

        return jax.jit(lambda v, x: (module.apply(v, x), jax.grad(loss, (0, 1))(v, x)))(
            variables, x)

    y_ours, g_ours = outputs_and_grads(ours, x)
    y_theirs, g_theirs = outputs_and_grads(theirs, _linen_input(name, x))
    close(y_ours, y_theirs)
    trees_close(g_ours[0], g_theirs[0])
    close(g_ours[1], g_theirs[1].reshape(x.shape))
    for path, g in jax.tree_util.tree_leaves_with_path(g_ours[0]):  # every parameter trains
        assert float(jnp.max(jnp.abs(g))) > 0, jax.tree_util.keystr(path)


def test_linen_batch_norm_matches_flax_and_updates_running_stats():
    momentum = 0.8
    ours = L.BatchNorm(use_running_average=False, momentum=momentum, epsilon=1e-3)
    theirs = nn.BatchNorm(use_running_average=False, momentum=momentum, epsilon=1e-3)
    x = image()
    variables = theirs.init(KEY, x)
    init_ours = ours.init(KEY, x)
    assert shapes(init_ours) == shapes(variables)
    # init leaves the statistics at their start values, as Flax does
    np.testing.assert_array_equal(init_ours["batch_stats"]["mean"], np.zeros(C))
    np.testing.assert_array_equal(init_ours["batch_stats"]["var"], np.ones(C))
    params = {"params": {"scale": jnp.linspace(0.5, 1.5, C), "bias": jnp.linspace(-1, 1, C)}}
    variables = {**variables, **params}

    y, updates = ours.apply(variables, x, mutable=["batch_stats"])
    y_flax, updates_flax = theirs.apply(variables, x, mutable=["batch_stats"])
    close(y, y_flax)
    trees_close(updates, updates_flax)
    # the documented update, from numpy batch statistics (biased variance)
    xn = np.asarray(x, np.float64)
    np.testing.assert_allclose(updates["batch_stats"]["mean"],
                               (1 - momentum) * xn.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(updates["batch_stats"]["var"],
                               momentum + (1 - momentum) * xn.var(axis=(0, 1, 2)),
                               rtol=1e-5, atol=1e-6)
    expected = (xn - xn.mean((0, 1, 2))) / np.sqrt(xn.var((0, 1, 2)) + 1e-3) * np.asarray(
        params["params"]["scale"]) + np.asarray(params["params"]["bias"])
    close(y, expected)

    # inference with the running statistics, the flag given at call time (Flax's rule: in
    # the constructor or at call time, not both)
    trained = {**variables, **updates}
    close(ours.clone(use_running_average=None).apply(trained, x, use_running_average=True),
           theirs.clone(use_running_average=None).apply(trained, x, use_running_average=True))
    with pytest.raises(ValueError, match="use_running_average"):
        ours.apply(trained, x, use_running_average=True)

    def loss(module, params):
        y, _ = module.apply({**variables, **params}, x, mutable=["batch_stats"])
        return weighted_sum(y)

    trees_close(jax.grad(loss, argnums=1)(ours, params),
                 jax.grad(loss, argnums=1)(theirs, params))


def test_linen_batch_norm_axis_name_averages_across_shards():
    ours = L.BatchNorm(use_running_average=False, axis_name="shards")
    x = image((4, 3, 2, C))
    variables = ours.init(KEY, x)
    whole, whole_stats = ours.clone(axis_name=None).apply(variables, x, mutable=["batch_stats"])

    def shard(xs):
        return ours.apply(variables, xs, mutable=["batch_stats"])

    y, stats = jax.vmap(shard, axis_name="shards")(x.reshape(2, 2, 3, 2, C))
    close(y.reshape(x.shape), whole)
    trees_close(jax.tree.map(lambda s: s[0], stats), whole_stats)


def test_linen_batch_norm_takes_features():
    ours = L.BatchNorm(use_running_average=False)
    theirs = nn.BatchNorm(use_running_average=False)
    x = image((6, C))
    variables = theirs.init(KEY, x)
    y, updates = ours.apply(variables, x, mutable=["batch_stats"])
    y_flax, updates_flax = theirs.apply(variables, x, mutable=["batch_stats"])
    close(y, y_flax)
    trees_close(updates, updates_flax)


WINDOW_NORMS = {
    "spatial_norm": (dict(kernel_size=(3, 2), alpha=0.7, beta=0.75, delta=1.5),
                     jaxmps.spatial_norm, L.SpatialNorm, N.SpatialNorm),
    "local_contrast_norm": (dict(kernel_size=3, alpha=0.9, beta=0.6, delta=0.25, p0=0.8,
                                 pm=0.1, ps=1.3),
                            jaxmps.local_contrast_norm, L.LocalContrastNorm,
                            N.LocalContrastNorm),
    "cross_channel_norm": (dict(kernel_size=3, alpha=0.8, beta=0.75, delta=1.25),
                           jaxmps.cross_channel_norm, L.CrossChannelNorm, N.CrossChannelNorm),
}


@pytest.mark.parametrize("name", WINDOW_NORMS)
@pytest.mark.parametrize("data_format", ["NHWC", "NCHW"])
def test_window_norms_match_reference(name, data_format):
    settings, function, linen_cls, nnx_cls = WINDOW_NORMS[name]
    x = image()
    if data_format == "NCHW":
        x = jnp.transpose(x, (0, 3, 1, 2))
    expected = function(x, **settings, data_format=data_format, implementation="reference")
    linen_layer = linen_cls(**settings, data_format=data_format)
    assert linen_layer.init(KEY, x) == {}  # no parameters
    close(linen_layer.apply({}, x), expected)
    nnx_layer = nnx_cls(**settings, data_format=data_format)
    close(nnx.jit(lambda m, x: m(x))(nnx_layer, x), expected)
    # the gradient is the reference's
    g = jax.grad(lambda x: jnp.sum(jnp.sin(linen_layer.apply({}, x))))(x)
    g_ref = jax.grad(lambda x: jnp.sum(jnp.sin(function(
        x, **settings, data_format=data_format, implementation="reference"))))(x)
    close(g, g_ref)


@pytest.mark.parametrize("module", [
    lambda: L.InstanceNorm(data_format="NCHW"),
    lambda: L.BatchNorm(use_running_average=False, data_format="NCHW"),
    lambda: L.Conv(3, (3, 2), strides=2, data_format="NCHW"),
    lambda: L.ConvTranspose(3, (3, 2), strides=2, data_format="NCHW"),
])
def test_linen_nchw_matches_nhwc(module):
    x = image()
    m = module()
    x_nchw = jnp.transpose(x, (0, 3, 1, 2))
    variables = m.init(KEY, x_nchw)
    nhwc = m.clone(data_format="NHWC")
    y, _ = nhwc.apply(variables, x, mutable=["batch_stats"])
    y_nchw, _ = m.apply(variables, x_nchw, mutable=["batch_stats"])
    close(jnp.transpose(y_nchw, (0, 2, 3, 1)), y)


def test_linen_reference_and_native_agree_under_jit():
    x = image()
    for make in (lambda impl: L.InstanceNorm(implementation=impl),
                 lambda impl: L.Conv(5, (3, 3), strides=2, implementation=impl),
                 lambda impl: L.Dense(3, implementation=impl)):
        variables = make(None).init(KEY, x)
        close(jax.jit(make(None).apply)(variables, x), make("reference").apply(variables, x))


def test_linen_dtype_promotion_follows_flax():
    x = image().astype(jnp.bfloat16)
    variables = L.Conv(3, (3, 3)).init(KEY, x)
    assert L.Conv(3, (3, 3)).apply(variables, x).dtype == jnp.float32  # promoted with params
    assert L.Conv(3, (3, 3), dtype=jnp.bfloat16).apply(variables, x).dtype == jnp.bfloat16
    v = L.InstanceNorm(param_dtype=jnp.bfloat16).init(KEY, x)
    assert v["params"]["scale"].dtype == jnp.bfloat16


def test_linen_errors_name_the_layer():
    with pytest.raises(ValueError, match=r"jaxmps.flax.linen.InstanceNorm: data_format must"):
        L.InstanceNorm(data_format="HWC").init(KEY, image())
    with pytest.raises(ValueError, match=r"jaxmps.flax.linen.Conv: x must be a 4-d NHWC"):
        L.Conv(3).init(KEY, jnp.ones((2, 3)))
    with pytest.raises(ValueError, match=r"jaxmps.flax.linen.Conv: padding must be"):
        L.Conv(3, padding="CIRCULAR").init(KEY, image())


# ---- nnx -----------------------------------------------------------------------------------


NNX_PAIRS = {
    "instance_norm": (lambda r: N.InstanceNorm(C, epsilon=1e-3, rngs=r),
                      lambda r: nnx.InstanceNorm(C, epsilon=1e-3, rngs=r)),
    "conv": (lambda r: N.Conv(C, 6, (3, 3), strides=(2, 1), rngs=r),
             lambda r: nnx.Conv(C, 6, (3, 3), strides=(2, 1), rngs=r)),
    "conv_grouped": (lambda r: N.Conv(C, 6, (2, 2), feature_group_count=2, padding="VALID",
                                      rngs=r),
                     lambda r: nnx.Conv(C, 6, (2, 2), feature_group_count=2, padding="VALID",
                                        rngs=r)),
    "conv_transpose": (lambda r: N.ConvTranspose(C, 5, (3, 3), strides=2, rngs=r),
                       lambda r: nnx.ConvTranspose(C, 5, (3, 3), strides=2, rngs=r)),
    "linear": (lambda r: N.Linear(6 * 5 * C, 7, rngs=r),
               lambda r: nnx.Linear(6 * 5 * C, 7, rngs=r)),
}


def _nnx_loss(model, x):
    y = model(x)
    return weighted_sum(y)


@pytest.mark.parametrize("name", NNX_PAIRS)
def test_nnx_matches_flax(name):
    make_ours, make_theirs = NNX_PAIRS[name]
    ours, theirs = make_ours(nnx.Rngs(3)), make_theirs(nnx.Rngs(3))
    # same parameter names, shapes and (same initializers, same keys) values
    trees_close(nnx.state(ours, nnx.Param), nnx.state(theirs, nnx.Param), scale=0)
    x = image()
    x_theirs = x.reshape(x.shape[0], -1) if name == "linear" else x
    close(nnx.jit(lambda m, x: m(x))(ours, x), theirs(x_theirs))
    g_ours = nnx.grad(_nnx_loss)(ours, x)
    g_theirs = nnx.grad(_nnx_loss)(theirs, x_theirs)
    trees_close(g_ours, g_theirs)
    for path, g in jax.tree_util.tree_leaves_with_path(g_ours):
        assert float(jnp.max(jnp.abs(g))) > 0, jax.tree_util.keystr(path)


def test_nnx_batch_norm_matches_flax_train_and_eval():
    ours = N.BatchNorm(C, momentum=0.7, rngs=nnx.Rngs(0))
    theirs = nnx.BatchNorm(C, momentum=0.7, rngs=nnx.Rngs(0))
    for model in (ours, theirs):  # non-trivial scale and bias
        model.scale[...] = jnp.linspace(0.5, 1.5, C)
        model.bias[...] = jnp.linspace(-1, 1, C)
    trees_close(nnx.state(ours), nnx.state(theirs), scale=0)
    x = image()
    step = nnx.jit(lambda m, x: m(x))
    for _ in range(2):  # two updates of the running statistics
        close(step(ours, x), theirs(x))
        x = x * 0.5 + 1.0
    trees_close(nnx.state(ours, nnx.BatchStat), nnx.state(theirs, nnx.BatchStat))
    ours.eval()
    theirs.eval()
    assert ours.use_running_average
    close(step(ours, x), theirs(x))
    close(nnx.view(ours, use_running_average=False)(x),
           nnx.view(theirs, use_running_average=False)(x))
    ours.train()
    theirs.train()
    g_ours = nnx.grad(_nnx_loss)(ours, x)
    g_theirs = nnx.grad(_nnx_loss)(theirs, x)
    trees_close(g_ours, g_theirs)


def test_nnx_optimizer_step_trains_every_parameter():
    """A model of every parameterised nnx layer: one optax step under nnx.jit moves every
    parameter and the batch statistics."""
    optax = pytest.importorskip("optax")

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.conv = N.Conv(C, 6, (3, 3), rngs=rngs)
            self.bn = N.BatchNorm(6, rngs=rngs)
            self.up = N.ConvTranspose(6, 4, (2, 2), strides=2, rngs=rngs)
            self.inorm = N.InstanceNorm(4, rngs=rngs)
            self.lrn = N.CrossChannelNorm(3)
            self.head = N.Dense(12 * 10 * 4, 3, rngs=rngs)

        def __call__(self, x):
            # a relu before each norm: a bias straight into a norm would get no gradient
            x = self.bn(jax.nn.relu(self.conv(x)))
            return self.head(self.lrn(self.inorm(jax.nn.relu(self.up(x)))))

    model = Model(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    before = jax.tree.map(jnp.copy, nnx.state(model))

    @nnx.jit
    def step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(
            lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean())(model)
        optimizer.update(model, grads)
        return loss

    step(model, optimizer, image(), jnp.array([0, 2]))
    after = nnx.state(model)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(before),
                            jax.tree.leaves(after)):
        assert not np.allclose(a, b), f"{jax.tree_util.keystr(path)} did not change"


def test_jaxmps_imports_without_flax_or_haiku():
    """Flax and Haiku are optional extras: jaxmps imports without them, and the layer modules
    and the demo say what to install."""
    import os
    import subprocess
    import sys

    script = (
        "import sys\n"
        "sys.modules['flax'] = sys.modules['haiku'] = None  # as if not installed\n"
        "import jaxmps\n"
        "for name in ('jaxmps.flax', 'jaxmps.haiku'):\n"
        "    try:\n"
        "        __import__(name)\n"
        "    except ImportError as e:\n"
        "        print(e)\n"
        "from jaxmps.__main__ import main\n"
        "print('exit', main([]))\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, cwd=root)
    assert done.returncode == 0, done.stderr
    assert "jaxmps.flax needs Flax: pip install flax" in done.stdout
    assert "jaxmps.haiku needs Haiku: pip install dm-haiku" in done.stdout
    assert "exit 2" in done.stdout and "the demo needs Flax" in done.stderr

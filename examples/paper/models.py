"""The SAM-GS paper's networks in Flax NNX: SegNet-MTAN, SegNet-split and the CelebA CNN.

Reference: the authors' PyTorch models (ThomBors/samgs, ``experiments/{nyuv2,cityscapes}/
models.py`` and ``experiments/celeba/models.py``), themselves MTAN's (Liu et al., 2019) and
FAMO's. Rewritten here layer by layer, NHWC, with the same parameter shapes, so the parameter
counts are theirs (:data:`AUTHOR_PARAM_COUNTS`, checked in ``tests/test_paper_train.py``):

* **SegNet blocks**: ``conv 3x3 (bias) + BatchNorm + ReLU`` with filters
  ``[64, 128, 256, 512, 512]``; 2x2 max-pooling that records the arg-max and max-unpooling
  that puts each value back where it came from (PyTorch's ``MaxPool2d(return_indices=True)``
  / ``MaxUnpool2d``; ties go to the first element in row-major order, as there).
* **SegNet-MTAN** adds, per task, an attention module at each of the 10 encoder/decoder
  stages (``conv 1x1 + BN + ReLU + conv 1x1 + BN + sigmoid``) and shared attention conv
  blocks; the attention decoder upsamples by 2 with bilinear ``align_corners=True``.
* **SegNet-split**: the shared encoder-decoder feeding every head directly.
* **Heads** (``pred``): ``conv 3x3 (64 -> 64)`` then ``conv 1x1 (64 -> outputs)``, no
  normalisation. Outputs: segmentation ``log_softmax`` over classes, depth raw, normals
  divided by their L2 norm.
* **CelebA CNN**: 7 bias-free ``conv 3x3 + BN + ReLU`` (64, 128, 128, 256, 256, 512, 512
  channels, max-pool after the 1st, 3rd and 5th), global average pooling, twice
  ``Linear(512, 512, no bias) + BatchNorm1d + ReLU``, and 40 heads ``Linear(512, 1)`` +
  sigmoid, stored as the 40 columns of one ``Linear(512, 40)`` (same parameters, and the
  gradient of task k's loss reaches column k only, so each head still gets its own task's
  gradient).

**What is shared** is what the authors' ``shared_parameters()`` returns: every parameter not
under a head. Every model keeps its heads under the attribute ``pred``, so
:data:`SHARED` (``nnx.Not(nnx.PathContains("pred"))``) is the ``mask`` of
``samgs_optax.recipe`` for all of them. For SegNet-MTAN this includes the *task-specific*
attention modules, as in the authors' code (their names lack ``pred``).

Initialisation follows theirs: SegNet: Xavier-normal convolution kernels, zero biases;
CelebA: PyTorch's defaults (kernels and biases uniform in ``+-1/sqrt(fan_in)``); BatchNorm
scale 1, bias 0. BatchNorm uses PyTorch's momentum 0.1 (Flax ``momentum=0.9``),
``eps=1e-5`` and a two-pass batch variance; one difference remains: PyTorch updates the
running variance with the unbiased batch variance (factor ``n / (n - 1)``, ``n`` = pixels x
batch), Flax with the biased one (at the real shapes ``n >= 210``: CelebA's last, smaller
batch in its ``BatchNorm1d``; so the factor is at most 1.005).

Checked against the authors' PyTorch modules with their weights copied in
(``docs/paper_benchmarks.md``): same outputs and gradients up to floating-point rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

FILTERS = (64, 128, 256, 512, 512)
SHARED = nnx.Not(nnx.PathContains("pred"))
"""NNX filter of the shared parameters (the surgery's ``mask``) of every model here."""
HEADS = nnx.PathContains("pred")
"""NNX filter of the task-specific head parameters."""

BN_MOMENTUM = 0.9  # PyTorch's momentum=0.1
BN_EPSILON = 1e-5

# Dense tasks: (name, output channels) per dataset, in the authors' order.
DENSE_TASKS: dict[str, tuple[tuple[str, int], ...]] = {
    "nyuv2": (("segmentation", 13), ("depth", 1), ("normal", 3)),
    "cityscapes": (("segmentation", 7), ("depth", 1)),
}
CELEBA_TASKS = 40

# Parameter counts of the authors' PyTorch models (docs/paper_benchmarks.md says how they
# were obtained); the Flax models here must have exactly these.
AUTHOR_PARAM_COUNTS: dict[tuple[str, str], int] = {
    ("nyuv2", "mtan"): 44_229_073,
    ("nyuv2", "split"): 25_055_185,
    ("cityscapes", "mtan"): 41_206_984,
    ("cityscapes", "split"): 25_017_672,
    ("celeba", "cnn"): 5_197_160,
}

_xavier_normal = nnx.initializers.variance_scaling(1.0, "fan_avg", "normal")
_torch_default = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _torch_bias(fan_in: int) -> Callable[..., jax.Array]:
    """PyTorch's default bias initialiser: uniform in ``+-1/sqrt(fan_in)``."""
    bound = 1.0 / np.sqrt(fan_in)

    def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _batch_norm(features: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
    """PyTorch's BatchNorm: momentum 0.1, eps 1e-5, and a two-pass batch variance.

    ``use_fast_variance=False``: Flax's default ``E[x^2] - E[x]^2`` loses float32 precision
    when the mean dominates (it made SegNet-MTAN's training-mode outputs differ from
    PyTorch's by 3e-2 relative; two-pass: 3e-5).
    """
    return nnx.BatchNorm(
        features,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        use_fast_variance=False,
        rngs=rngs,
    )


def _conv(c_in: int, c_out: int, kernel: int, rngs: nnx.Rngs, **kwargs: Any) -> nnx.Conv:
    """A SegNet convolution: Xavier-normal kernel, zero bias, 'SAME' padding."""
    return nnx.Conv(c_in, c_out, (kernel, kernel), kernel_init=_xavier_normal, rngs=rngs, **kwargs)


# ---------------------------------------------------------------------------------------
# Pooling and upsampling, NHWC
# ---------------------------------------------------------------------------------------
def _windows(x: jax.Array) -> jax.Array:
    """(4, B, H/2, W/2, C): the 2x2 window elements in row-major order."""
    b, h, w, c = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"2x2 pooling needs even height and width, got {h}x{w}")
    x = x.reshape(b, h // 2, 2, w // 2, 2, c)
    return jnp.stack([x[:, :, 0, :, 0], x[:, :, 0, :, 1], x[:, :, 1, :, 0], x[:, :, 1, :, 1]])


def max_pool_with_argmax(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """2x2 max-pooling, stride 2: ``(pooled, where)``.

    ``where`` (bool, ``(4, B, H/2, W/2, C)``) marks the element each output came from: the
    first maximum in row-major order, as PyTorch's ``MaxPool2d(return_indices=True)``. The
    gradient flows to that element only.
    """
    windows = _windows(x)
    first = jnp.argmax(windows, axis=0)
    where = first[None] == jnp.arange(4).reshape(4, 1, 1, 1, 1)
    return jnp.sum(jnp.where(where, windows, 0), axis=0), where


def max_pool(x: jax.Array) -> jax.Array:
    """2x2 max-pooling, stride 2 (``F.max_pool2d(x, 2, 2)``)."""
    return max_pool_with_argmax(x)[0]


def max_unpool(x: jax.Array, where: jax.Array) -> jax.Array:
    """Inverse of :func:`max_pool_with_argmax`: each value back at its arg-max, zeros elsewhere."""
    b, h, w, c = x.shape
    parts = jnp.where(where, x[None], 0).reshape(2, 2, b, h, w, c)
    return parts.transpose(2, 3, 0, 4, 1, 5).reshape(b, 2 * h, 2 * w, c)


def _bilinear_axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(i0, i1, t)`` of ``align_corners=True`` interpolation, in float32 as PyTorch."""
    scale = np.float32((n_in - 1) / (n_out - 1)) if n_out > 1 else np.float32(0)
    src = np.arange(n_out, dtype=np.float32) * scale
    i0 = np.minimum(np.floor(src).astype(np.int32), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (src - i0).astype(np.float32)


def upsample_bilinear_x2(x: jax.Array) -> jax.Array:
    """``F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)``, NHWC."""
    _, h, w, _ = x.shape
    for axis, n in ((1, h), (2, w)):
        i0, i1, t = _bilinear_axis(n, 2 * n)
        shape = [1, 1, 1, 1]
        shape[axis] = 2 * n
        t = jnp.asarray(t).reshape(shape)
        low, high = jnp.take(x, i0, axis=axis), jnp.take(x, i1, axis=axis)
        x = low + (high - low) * t
    return x


# ---------------------------------------------------------------------------------------
# SegNet building blocks
# ---------------------------------------------------------------------------------------
class ConvBlock(nnx.Module):
    """``conv 3x3 (bias) + BatchNorm + ReLU`` (the authors' ``conv_layer``)."""

    def __init__(self, c_in: int, c_out: int, *, rngs: nnx.Rngs):
        self.conv = _conv(c_in, c_out, 3, rngs)
        self.norm = _batch_norm(c_out, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return nnx.relu(self.norm(self.conv(x)))


class Attention(nnx.Module):
    """``conv 1x1 + BN + ReLU + conv 1x1 + BN + sigmoid`` (the authors' ``att_layer``)."""

    def __init__(self, c_in: int, c_mid: int, c_out: int, *, rngs: nnx.Rngs):
        self.conv1 = _conv(c_in, c_mid, 1, rngs)
        self.norm1 = _batch_norm(c_mid, rngs)
        self.conv2 = _conv(c_mid, c_out, 1, rngs)
        self.norm2 = _batch_norm(c_out, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.norm1(self.conv1(x)))
        return nnx.sigmoid(self.norm2(self.conv2(x)))


class DenseHead(nnx.Module):
    """``conv 3x3 (c -> c)`` then ``conv 1x1 (c -> outputs)``, both with bias."""

    def __init__(self, channels: int, outputs: int, *, rngs: nnx.Rngs):
        self.conv1 = _conv(channels, channels, 3, rngs)
        self.conv2 = _conv(channels, outputs, 1, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv2(self.conv1(x))


def _stage(blocks: Sequence[ConvBlock]) -> nnx.List:
    return nnx.List(list(blocks))


def _run(blocks: nnx.List, x: jax.Array) -> jax.Array:
    for block in blocks:
        x = block(x)
    return x


def postprocess(task: str, output: jax.Array) -> jax.Array:
    """The authors' output layer: ``log_softmax`` (segmentation), identity (depth),
    division by the L2 norm (normals)."""
    if task == "segmentation":
        return jax.nn.log_softmax(output, axis=-1)
    if task == "normal":
        return output / jnp.linalg.norm(output, axis=-1, keepdims=True)
    return output


class SegNetBackbone(nnx.Module):
    """The shared SegNet encoder-decoder: 5 stages down, 5 stages up (SegNet-split's trunk).

    ``features(x)`` returns every intermediate MTAN needs; ``__call__`` the last decoder
    output (64 channels, full resolution). Height and width must be multiples of 32.
    """

    def __init__(self, filters: Sequence[int] = FILTERS, *, rngs: nnx.Rngs):
        f = list(filters)
        self.encoder_block = nnx.List(
            [ConvBlock(3, f[0], rngs=rngs)]
            + [ConvBlock(f[i], f[i + 1], rngs=rngs) for i in range(4)]
        )
        self.decoder_block = nnx.List(
            [ConvBlock(f[0], f[0], rngs=rngs)]
            + [ConvBlock(f[i + 1], f[i], rngs=rngs) for i in range(4)]
        )
        enc = [
            _stage([ConvBlock(f[0], f[0], rngs=rngs)]),
            _stage([ConvBlock(f[1], f[1], rngs=rngs)]),
        ]
        dec = [
            _stage([ConvBlock(f[0], f[0], rngs=rngs)]),
            _stage([ConvBlock(f[0], f[0], rngs=rngs)]),
        ]
        for i in range(1, 4):
            enc.append(_stage([ConvBlock(f[i + 1], f[i + 1], rngs=rngs) for _ in range(2)]))
            dec.append(_stage([ConvBlock(f[i], f[i], rngs=rngs) for _ in range(2)]))
        self.conv_block_enc = nnx.List(enc)
        self.conv_block_dec = nnx.List(dec)

    def features(self, x: jax.Array) -> dict[str, list[jax.Array]]:
        """``enc0``/``enc1``: encoder stage outputs before/after the conv blocks; ``up``: the
        unpooled decoder inputs; ``dec``: decoder stage outputs (coarse to fine)."""
        enc0, enc1, where = [], [], []
        for i in range(5):
            enc0.append(self.encoder_block[i](x))
            enc1.append(_run(self.conv_block_enc[i], enc0[i]))
            x, w = max_pool_with_argmax(enc1[i])
            where.append(w)
        up, dec = [], []
        for i in range(5):
            up.append(max_unpool(x, where[4 - i]))
            x = _run(self.conv_block_dec[4 - i], self.decoder_block[4 - i](up[i]))
            dec.append(x)
        return {"enc0": enc0, "enc1": enc1, "up": up, "dec": dec}

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.features(x)["dec"][-1]


def _check_tasks(tasks: Sequence[tuple[str, int]]) -> tuple[tuple[str, int], ...]:
    tasks = tuple((str(name), int(n)) for name, n in tasks)
    if not tasks:
        raise ValueError("a model needs at least one task")
    return tasks


class SegNetSplit(nnx.Module):
    """SegNet-split: the shared :class:`SegNetBackbone` and one head per task.

    ``tasks``: ``(name, outputs)`` pairs, e.g. :data:`DENSE_TASKS` ``["nyuv2"]``. Returns a
    dict ``name -> (B, H, W, outputs)`` after :func:`postprocess`.
    """

    def __init__(
        self,
        tasks: Sequence[tuple[str, int]],
        filters: Sequence[int] = FILTERS,
        *,
        rngs: nnx.Rngs,
    ):
        self.tasks = _check_tasks(tasks)
        self.backbone = SegNetBackbone(filters, rngs=rngs)
        self.pred = nnx.List([DenseHead(filters[0], n, rngs=rngs) for _, n in self.tasks])

    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        z = self.backbone(x)
        return {
            name: postprocess(name, head(z))
            for (name, _), head in zip(self.tasks, self.pred, strict=True)
        }


class SegNetMTAN(nnx.Module):
    """SegNet-MTAN (Liu et al., 2019): the shared SegNet plus one attention network per task.

    Per task ``t`` and encoder stage ``j``, an attention mask computed from the stage's first
    features (and the previous attended output) gates the stage's output, and a shared conv
    block plus max-pooling carries it down; the decoder mirrors this with bilinear upsampling.
    The head of task ``t`` reads its last attended decoder features. Returns a dict
    ``name -> (B, H, W, outputs)`` after :func:`postprocess`.
    """

    def __init__(
        self,
        tasks: Sequence[tuple[str, int]],
        filters: Sequence[int] = FILTERS,
        *,
        rngs: nnx.Rngs,
    ):
        self.tasks = _check_tasks(tasks)
        f = list(filters)
        self.backbone = SegNetBackbone(filters, rngs=rngs)
        self.encoder_att = nnx.List(
            [
                nnx.List(
                    [Attention(f[0], f[0], f[0], rngs=rngs)]
                    + [Attention(2 * f[i + 1], f[i + 1], f[i + 1], rngs=rngs) for i in range(4)]
                )
                for _ in self.tasks
            ]
        )
        self.decoder_att = nnx.List(
            [
                nnx.List(
                    [Attention(2 * f[0], f[0], f[0], rngs=rngs)]
                    + [Attention(f[i + 1] + f[i], f[i], f[i], rngs=rngs) for i in range(4)]
                )
                for _ in self.tasks
            ]
        )
        enc_att = [(f[0], f[1]), (f[1], f[2]), (f[2], f[3]), (f[3], f[4]), (f[4], f[4])]
        dec_att = [(f[0], f[0]), (f[1], f[0]), (f[2], f[1]), (f[3], f[2]), (f[4], f[4])]
        self.encoder_block_att = nnx.List([ConvBlock(a, b, rngs=rngs) for a, b in enc_att])
        self.decoder_block_att = nnx.List([ConvBlock(a, b, rngs=rngs) for a, b in dec_att])
        self.pred = nnx.List([DenseHead(f[0], n, rngs=rngs) for _, n in self.tasks])

    def _attend(self, t: int, feats: dict[str, list[jax.Array]]) -> jax.Array:
        """Task ``t``'s attended decoder output at full resolution."""
        enc0, enc1, up, dec = feats["enc0"], feats["enc1"], feats["up"], feats["dec"]
        a = None
        for j in range(5):
            gate_in = enc0[j] if j == 0 else jnp.concatenate([enc0[j], a], axis=-1)
            gated = self.encoder_att[t][j](gate_in) * enc1[j]
            a = max_pool(self.encoder_block_att[j](gated))
        for j in range(5):
            a = self.decoder_block_att[4 - j](upsample_bilinear_x2(a))
            mask = self.decoder_att[t][4 - j](jnp.concatenate([up[j], a], axis=-1))
            a = mask * dec[j]
        return a

    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        feats = self.backbone.features(x)
        return {
            name: postprocess(name, self.pred[t](self._attend(t, feats)))
            for t, (name, _) in enumerate(self.tasks)
        }


# ---------------------------------------------------------------------------------------
# CelebA
# ---------------------------------------------------------------------------------------
class CelebaCNN(nnx.Module):
    """The authors' CelebA network: a shared CNN and ``num_tasks`` sigmoid heads.

    ``logits(x)`` is ``(B, num_tasks)`` (one column per head); ``__call__`` applies the
    sigmoid, as their ``forward``. Images ``(B, H, W, 3)`` in [0, 1], any H, W >= 8.
    """

    CHANNELS = (64, "pool", 128, 128, "pool", 256, 256, "pool", 512, 512)

    def __init__(self, num_tasks: int = CELEBA_TASKS, *, rngs: nnx.Rngs):
        convs, norms, c_in = [], [], 3
        for item in self.CHANNELS:
            if item == "pool":
                continue
            convs.append(
                nnx.Conv(c_in, item, (3, 3), use_bias=False, kernel_init=_torch_default, rngs=rngs)
            )
            norms.append(_batch_norm(item, rngs))
            c_in = item
        self.convs, self.conv_norms = nnx.List(convs), nnx.List(norms)
        self.fc = nnx.List(
            [
                nnx.Linear(512, 512, use_bias=False, kernel_init=_torch_default, rngs=rngs)
                for _ in range(2)
            ]
        )
        self.fc_norms = nnx.List([_batch_norm(512, rngs) for _ in range(2)])
        self.pred = nnx.Linear(
            512, num_tasks, kernel_init=_torch_default, bias_init=_torch_bias(512), rngs=rngs
        )

    def representation(self, x: jax.Array) -> jax.Array:
        """The shared 512-dimensional features."""
        layer = 0
        for item in self.CHANNELS:
            if item == "pool":
                x = nnx.max_pool(x, (2, 2), (2, 2))
            else:
                x = nnx.relu(self.conv_norms[layer](self.convs[layer](x)))
                layer += 1
        x = jnp.mean(x, axis=(1, 2))
        for fc, norm in zip(self.fc, self.fc_norms, strict=True):
            x = nnx.relu(norm(fc(x)))
        return x

    def logits(self, x: jax.Array) -> jax.Array:
        return self.pred(self.representation(x))

    def __call__(self, x: jax.Array) -> jax.Array:
        return nnx.sigmoid(self.logits(x))


# ---------------------------------------------------------------------------------------
# Construction and counting
# ---------------------------------------------------------------------------------------
MODELS = {"mtan": SegNetMTAN, "split": SegNetSplit}


def build_model(
    dataset: str,
    model: str = "mtan",
    *,
    tasks: Sequence[str] | None = None,
    seed: int = 0,
    filters: Sequence[int] = FILTERS,
) -> nnx.Module:
    """The authors' model for ``dataset``.

    Args:
      dataset: ``nyuv2``, ``cityscapes`` or ``celeba``.
      model: ``mtan`` or ``split`` for the dense datasets (``celeba`` has one model; pass
        ``cnn`` or leave the default).
      tasks: a subset of the dataset's task names (dense) to build a single-task model;
        for CelebA, the attribute heads are all kept unless ``tasks`` gives their count.
      seed: ``nnx.Rngs`` seed of the initialisation.
      filters: SegNet widths (the authors' :data:`FILTERS`; narrower ones only make CPU
        smoke tests cheaper).
    """
    rngs = nnx.Rngs(seed)
    if dataset == "celeba":
        return CelebaCNN(CELEBA_TASKS if tasks is None else len(tasks), rngs=rngs)
    if dataset not in DENSE_TASKS:
        raise ValueError(f"unknown dataset {dataset!r}; expected nyuv2, cityscapes or celeba")
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r} for {dataset}; expected mtan or split")
    all_tasks = DENSE_TASKS[dataset]
    chosen = all_tasks if tasks is None else tuple(t for t in all_tasks if t[0] in set(tasks))
    if tasks is not None and len(chosen) != len(set(tasks)):
        raise ValueError(f"tasks {tasks} not all in {[t[0] for t in all_tasks]}")
    return MODELS[model](chosen, filters, rngs=rngs)


def abstract_model(dataset: str, model: str = "mtan", **kwargs: Any) -> nnx.Module:
    """:func:`build_model` under ``nnx.eval_shape``: shapes only, no memory, no FLOPs."""
    return nnx.eval_shape(lambda: build_model(dataset, model, **kwargs))


def count_params(module: nnx.Module, which: Any = nnx.Param) -> int:
    """Number of scalars in the ``which`` variables (default: trainable parameters)."""
    state = nnx.state(module, which)
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(state)))


def param_counts(module: nnx.Module) -> dict[str, int]:
    """``total``, ``shared`` (the surgery's) and ``heads`` parameter counts."""
    return {
        "total": count_params(module),
        "shared": count_params(module, nnx.All(nnx.Param, SHARED)),
        "heads": count_params(module, nnx.All(nnx.Param, HEADS)),
    }


__all__ = [
    "AUTHOR_PARAM_COUNTS",
    "DENSE_TASKS",
    "HEADS",
    "SHARED",
    "CelebaCNN",
    "SegNetBackbone",
    "SegNetMTAN",
    "SegNetSplit",
    "abstract_model",
    "build_model",
    "count_params",
    "max_pool_with_argmax",
    "max_unpool",
    "param_counts",
    "upsample_bilinear_x2",
]

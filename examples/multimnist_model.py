"""MultiLeNet for MultiMNIST in Flax NNX, and a jit-compiled multi-task train step.

The model is the MultiLeNet shape of Sener & Koltun (2018): a LeNet-style encoder
shared by the tasks, and one small classifier head per task::

    encoder: conv 5x5 (1->10) -> maxpool 2 -> relu -> conv 5x5 (10->20) -> maxpool 2
             -> relu -> flatten (20*4*4 = 320 for 28x28 inputs) -> dense 50 -> relu
    head_k:  dense 50 -> relu -> dense 10 (logits for task k)

Sener & Koltun also use dropout; it is left out here so that a train step is a pure
function of (params, optimizer state, batch), which keeps resuming exact.

Only the encoder's parameters are *shared*: the surgery (SAM-GS or another aggregator)
acts on them, while each head gets the plain sum of the task gradients, i.e. its own
task's gradient, because the other tasks' losses do not depend on it. This module is
self-contained (JAX, Flax, optax and samgs_optax only) so that it can be imported both
as ``multimnist_model`` (with ``examples/`` on ``sys.path``) and as
``examples.multimnist_model``.

Reference: O. Sener and V. Koltun, *Multi-Task Learning as Multi-Objective
Optimization*, NeurIPS 2018.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import samgs_optax

PyTree = Any
TrainStep = Callable[..., tuple[PyTree, PyTree, jax.Array]]

IMAGE_SIZE = 28
NUM_CLASSES = 10


class Encoder(nnx.Module):
    """Shared LeNet-style trunk: (B, H, W) images in [0, 1] -> (B, 50) features."""

    def __init__(self, image_size: int = IMAGE_SIZE, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 10, (5, 5), padding="VALID", rngs=rngs)
        self.conv2 = nnx.Conv(10, 20, (5, 5), padding="VALID", rngs=rngs)
        side = ((image_size - 4) // 2 - 4) // 2
        self.fc = nnx.Linear(20 * side * side, 50, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x[..., None]
        x = nnx.relu(nnx.max_pool(self.conv1(x), (2, 2), (2, 2)))
        x = nnx.relu(nnx.max_pool(self.conv2(x), (2, 2), (2, 2)))
        return nnx.relu(self.fc(x.reshape(x.shape[0], -1)))


class Head(nnx.Module):
    """Task head: (B, 50) features -> (B, 10) logits."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(50, 50, rngs=rngs)
        self.out = nnx.Linear(50, NUM_CLASSES, rngs=rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        return self.out(nnx.relu(self.hidden(z)))


class MultiLeNet(nnx.Module):
    """Shared encoder plus ``num_tasks`` heads; returns logits of shape (K, B, 10)."""

    def __init__(self, num_tasks: int = 2, image_size: int = IMAGE_SIZE, *, rngs: nnx.Rngs):
        self.encoder = Encoder(image_size, rngs=rngs)
        self.heads = nnx.List([Head(rngs=rngs) for _ in range(num_tasks)])

    def __call__(self, x: jax.Array) -> jax.Array:
        z = self.encoder(x)
        return jnp.stack([head(z) for head in self.heads])


def init_model(seed: int, num_tasks: int = 2, image_size: int = IMAGE_SIZE):
    """Returns ``(graphdef, params)`` of a freshly initialised :class:`MultiLeNet`."""
    model = MultiLeNet(num_tasks, image_size, rngs=nnx.Rngs(seed))
    return nnx.split(model)


def shared_mask(params: PyTree) -> PyTree:
    """Tree of bools like ``params``: True for the encoder's (shared) leaves."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[0], "key", None) == "encoder", params
    )


def task_losses(
    graphdef: nnx.GraphDef,
    params: PyTree,
    images: jax.Array,
    labels: jax.Array,
    loss_weights: jax.Array,
) -> jax.Array:
    r"""Weighted per-task losses, shape (K,).

    :math:`L_k = w_k \cdot \frac{1}{B}\sum_b \mathrm{CE}(f_k(x_b), y_{b,k})` with
    ``labels`` of shape (B, K) and ``loss_weights`` of shape (K,).
    """
    logits = nnx.merge(graphdef, params)(images)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels.T.astype(jnp.int32))
    return jnp.mean(ce, axis=1) * loss_weights


def make_samgs_optimizer(
    num_tasks: int,
    mask: PyTree,
    learning_rate: float = 1e-3,
    *,
    gamma: float = 0.1,
    b1: float = 0.9,
    b2: float = 0.99,
    m_dtype: Any | None = None,
) -> optax.GradientTransformation:
    """SAM-GS on the shared leaves in the authors' recipe (:func:`samgs_optax.recipe`).

    ``chain(samgs, scale(K), clip_by_global_norm(1), adam(lr))`` with the scale and the
    clip on the shared (``mask``) leaves only; the heads get their own task's gradient.
    """
    return samgs_optax.recipe(
        "samgs", num_tasks, learning_rate, mask=mask, gamma=gamma, b1=b1, b2=b2, m_dtype=m_dtype
    )


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    *,
    per_task: bool = True,
    jac_mode: str = "auto",
) -> TrainStep:
    """Jit-compiled ``step(params, opt_state, images, labels, loss_weights)``.

    Returns ``(params, opt_state, losses)``. With ``per_task=True`` the gradients fed
    to ``tx`` are stacked per task (leading axis K, from
    :func:`samgs_optax.value_and_jacrev`), as every aggregator expects; with
    ``per_task=False`` ``tx`` receives the gradient of the summed loss (plain linear
    scalarisation).
    """

    def losses_fn(params, images, labels, loss_weights):
        return task_losses(graphdef, params, images, labels, loss_weights)

    def summed(params, images, labels, loss_weights):
        losses = losses_fn(params, images, labels, loss_weights)
        return jnp.sum(losses), losses

    update = optax.with_extra_args_support(tx).update

    @jax.jit
    def step(params, opt_state, images, labels, loss_weights):
        if per_task:
            grad_fn = samgs_optax.value_and_jacrev(losses_fn, mode=jac_mode)
            losses, grads = grad_fn(params, images, labels, loss_weights)
        else:
            (_, losses), grads = jax.value_and_grad(summed, has_aux=True)(
                params, images, labels, loss_weights
            )
        # task_losses: for the loss-aware aggregators (GradNorm, MoCo, DB-MTL); chains drop it
        # for every other transform.
        updates, opt_state = update(grads, opt_state, params, task_losses=losses)
        return optax.apply_updates(params, updates), opt_state, losses

    return step


def make_predict(graphdef: nnx.GraphDef) -> Callable[[PyTree, jax.Array], jax.Array]:
    """Jit-compiled ``predict(params, images) -> (K, B)`` predicted classes."""

    @jax.jit
    def predict(params, images):
        return jnp.argmax(nnx.merge(graphdef, params)(images), axis=-1)

    return predict


def accuracy(
    predict: Callable[[PyTree, jax.Array], jax.Array],
    params: PyTree,
    images: Any,
    labels: Any,
    batch_size: int = 1000,
) -> list[float]:
    """Per-task accuracy over a dataset, evaluated in fixed-size chunks."""
    correct = None
    for start in range(0, len(images), batch_size):
        pred = predict(params, jnp.asarray(images[start : start + batch_size]))
        hits = jnp.sum(pred == jnp.asarray(labels[start : start + batch_size]).T, axis=1)
        correct = hits if correct is None else correct + hits
    return [float(c) / len(images) for c in correct]


def example_batch(
    batch_size: int = 256, num_tasks: int = 2, seed: int = 0
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Random ``(images, labels, loss_weights)`` of the right shapes (for benchmarks)."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    images = jax.random.uniform(k1, (batch_size, IMAGE_SIZE, IMAGE_SIZE))
    labels = jax.random.randint(k2, (batch_size, num_tasks), 0, NUM_CLASSES)
    return images, labels, jnp.ones([num_tasks])


__all__: Sequence[str] = (
    "Encoder",
    "Head",
    "MultiLeNet",
    "accuracy",
    "example_batch",
    "init_model",
    "make_predict",
    "make_samgs_optimizer",
    "make_train_step",
    "shared_mask",
    "task_losses",
)

"""Fixed-shape graph batches of QM9 molecules and a message-passing network in Flax Linen.

Batches (:func:`make_graph_batch`): a batch of ``B`` molecules always has
``B * 9`` node slots and ``B * 72`` edge slots (each molecule's 9 heavy-atom
slots and the 72 ordered pairs of distinct slots, padding masked), so every
batch has the same shapes and the training step compiles once. Messages are
gathered along ``senders`` and summed into ``receivers`` with
``jax.ops.segment_sum``; the readout sums nodes into their graph with the
same. The edge slots are sorted by receiver.

Features (heavy atoms only, see :mod:`benchmarks.qm9.data`):

- node (14): one-hot element (C, N, O, F), one-hot number of attached
  hydrogens (0-4), and the number of bonded heavy neighbours / 4 together
  with ``1 - that`` (so a padded node is all zeros);
- edge (17): the interatomic distance in 16 Gaussian radial basis functions
  (centres 1.0 to 7.0 Å, width = their spacing) and a covalent-bond flag
  (distance below 1.2 times the sum of the covalent radii of Cordero et al.
  2008).

Model (:class:`MPNN`), after the authors' (PyG's NNConv QM9 example): a linear
embedding, ``num_steps`` rounds of an edge-conditioned convolution with mean
aggregation and a root weight, each followed by a GRU update (one set of
weights shared by the rounds), a Set2Set readout, a dense layer: this is the
shared **trunk**; then one linear **head** per target. The authors' edge
network maps each edge's features to a full ``dim x dim`` matrix (NNConv);
``edge_network="full"`` does the same. The default, ``"factorised"``, restricts
that matrix to ``U diag(phi(e_ij)) V`` with shared ``U, V`` (so the per-edge
work is ``dim`` multiplications instead of ``dim**2`` plus an MLP with
``dim**2`` outputs): the CPU-scale choice, see ``docs/benchmarks/qm9.md``.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.qm9.data import MAX_HEAVY_ATOMS

A = MAX_HEAVY_ATOMS
# The 72 ordered pairs (sender, receiver) of distinct slots, sorted by receiver.
_RECEIVERS, _SENDERS = (a.ravel() for a in np.meshgrid(np.arange(A), np.arange(A), indexing="ij"))
_KEEP = _RECEIVERS != _SENDERS
EDGE_RECEIVERS = _RECEIVERS[_KEEP].astype(np.int32)
EDGE_SENDERS = _SENDERS[_KEEP].astype(np.int32)
EDGES_PER_MOLECULE = int(EDGE_RECEIVERS.size)  # 72
# Covalent radii in Å (Cordero et al. 2008) of padding, C, N, O, F.
COVALENT_RADII = np.array([0.0, 0.76, 0.71, 0.66, 0.57], np.float32)
BOND_TOLERANCE = 1.2
RBF_CENTRES = np.linspace(1.0, 7.0, 16).astype(np.float32)
NODE_FEATURES = 4 + 5 + 2
EDGE_FEATURES = RBF_CENTRES.size + 1


class MoleculeArrays(NamedTuple):
    """One split's molecules on the device (``M`` molecules, ``A = 9`` slots).

    Attributes:
      atom_type: ``(M, A)`` int32, 1..4 for C, N, O, F, 0 for padding.
      num_hydrogens: ``(M, A)`` int32.
      positions: ``(M, A, 3)`` float32, Å.
      targets: ``(M, 11)`` float32, standardised targets.
    """

    atom_type: jax.Array
    num_hydrogens: jax.Array
    positions: jax.Array
    targets: jax.Array


class GraphBatch(NamedTuple):
    """``B`` molecules as one padded graph (``N = 9 B`` nodes, ``E = 72 B`` edges).

    Attributes:
      nodes: ``(N, NODE_FEATURES)`` float32 node features (zeros in padding).
      edges: ``(E, EDGE_FEATURES)`` float32 edge features (zeros in padding).
      senders: ``(E,)`` int32 node index each edge's message comes from.
      receivers: ``(E,)`` int32 node index it goes to (sorted ascending).
      node_mask: ``(N,)`` bool, real atoms.
      edge_mask: ``(E,)`` bool, edges between two real atoms.
      node_graph: ``(N,)`` int32 molecule of each node (sorted ascending).
      graph_mask: ``(B,)`` bool, all True (kept so ``B`` is a static shape).
    """

    nodes: jax.Array
    edges: jax.Array
    senders: jax.Array
    receivers: jax.Array
    node_mask: jax.Array
    edge_mask: jax.Array
    node_graph: jax.Array
    graph_mask: jax.Array

    @property
    def num_graphs(self) -> int:
        return self.graph_mask.shape[0]

    @property
    def num_nodes(self) -> int:
        return self.nodes.shape[0]


def make_graph_batch(molecules: MoleculeArrays, indices: jax.Array) -> tuple[GraphBatch, jax.Array]:
    """The molecules at ``indices`` (``(B,)``) as a :class:`GraphBatch` and ``(B, 11)`` targets.

    Works under ``jit`` and ``vmap``; the shapes depend on ``B`` only.
    """
    atom_type = molecules.atom_type[indices]  # (B, A)
    num_h = molecules.num_hydrogens[indices]
    pos = molecules.positions[indices]  # (B, A, 3)
    b = atom_type.shape[0]
    real = atom_type > 0
    diff = pos[:, EDGE_SENDERS] - pos[:, EDGE_RECEIVERS]  # (B, 72, 3)
    edge_mask = real[:, EDGE_SENDERS] & real[:, EDGE_RECEIVERS]
    # A padded slot sits at the origin: keep the distance finite and positive.
    dist = jnp.sqrt(jnp.sum(diff**2, axis=-1) + 1e-12)
    radii = jnp.asarray(COVALENT_RADII)[atom_type]
    bond_length = radii[:, EDGE_SENDERS] + radii[:, EDGE_RECEIVERS]
    bonded = edge_mask & (dist < BOND_TOLERANCE * bond_length)
    spacing = float(RBF_CENTRES[1] - RBF_CENTRES[0])
    rbf = jnp.exp(-(((dist[..., None] - RBF_CENTRES) / spacing) ** 2))
    edges = jnp.concatenate([rbf, bonded[..., None].astype(jnp.float32)], axis=-1)
    edges = edges * edge_mask[..., None]
    degree = jnp.zeros((b, A), jnp.float32).at[:, EDGE_RECEIVERS].add(bonded.astype(jnp.float32))
    degree = degree / 4.0
    nodes = jnp.concatenate(
        [
            jax.nn.one_hot(atom_type - 1, 4),  # padding (-1) -> all zeros
            jax.nn.one_hot(num_h, 5) * real[..., None],
            jnp.stack([degree, 1.0 - degree], axis=-1) * real[..., None],
        ],
        axis=-1,
    )
    offsets = (jnp.arange(b, dtype=jnp.int32) * A)[:, None]
    batch = GraphBatch(
        nodes=nodes.reshape(b * A, NODE_FEATURES),
        edges=edges.reshape(b * EDGES_PER_MOLECULE, EDGE_FEATURES),
        senders=(EDGE_SENDERS[None, :] + offsets).reshape(-1),
        receivers=(EDGE_RECEIVERS[None, :] + offsets).reshape(-1),
        node_mask=real.reshape(-1),
        edge_mask=edge_mask.reshape(-1),
        node_graph=jnp.repeat(jnp.arange(b, dtype=jnp.int32), A),
        graph_mask=jnp.ones((b,), bool),
    )
    return batch, molecules.targets[indices]


def segment_mean(data: jax.Array, segments: jax.Array, mask: jax.Array, num_segments: int):
    """Mean of the masked rows of ``data`` per segment (0 for a segment with none)."""
    weight = mask.astype(data.dtype)
    total = jax.ops.segment_sum(
        data * weight[:, None], segments, num_segments, indices_are_sorted=True
    )
    count = jax.ops.segment_sum(weight, segments, num_segments, indices_are_sorted=True)
    return total / jnp.maximum(count, 1.0)[:, None]


def gather_senders(h: jax.Array, graph: GraphBatch, ops: str) -> jax.Array:
    """``h[graph.senders]``; ``ops="blocked"`` uses the fixed per-molecule layout instead."""
    if ops == "segment":
        return h[graph.senders]
    hb = h.reshape(graph.num_graphs, A, h.shape[-1])
    return hb[:, EDGE_SENDERS].reshape(-1, h.shape[-1])


def sum_to_receivers(m: jax.Array, graph: GraphBatch, ops: str) -> jax.Array:
    """``segment_sum(m, graph.receivers)``; ``"blocked"``: the 8 edge slots of each receiver."""
    if ops == "segment":
        return jax.ops.segment_sum(m, graph.receivers, graph.num_nodes, indices_are_sorted=True)
    return m.reshape(graph.num_nodes, A - 1, m.shape[-1]).sum(axis=1)


class EdgeConv(nn.Module):
    """Edge-conditioned convolution with mean aggregation (PyG's ``NNConv(aggr="mean")``).

    ``out_i = W_root h_i + mean_{j -> i} W(e_ij) h_j + b``, with ``W(e)`` a full
    ``dim x dim`` matrix from an MLP of the edge features (``"full"``) or
    ``U diag(phi(e)) V`` (``"factorised"``). ``weights`` is the MLP's output,
    computed once per forward pass by :meth:`MPNN.edge_weights` since the
    edge features do not change between rounds.
    """

    dim: int
    edge_network: str
    ops: str = "segment"

    @nn.compact
    def __call__(self, h: jax.Array, weights: jax.Array, graph: GraphBatch) -> jax.Array:
        mask = graph.edge_mask.astype(h.dtype)[:, None]
        count = sum_to_receivers(mask, graph, self.ops)
        if self.edge_network == "full":
            w = weights.reshape(-1, self.dim, self.dim)
            messages = jnp.einsum("eio,ei->eo", w, gather_senders(h, graph, self.ops))
        else:
            projected = nn.Dense(self.dim, use_bias=False, name="V")(h)
            messages = weights * gather_senders(projected, graph, self.ops)
        aggregated = sum_to_receivers(messages * mask, graph, self.ops) / jnp.maximum(count, 1.0)
        if self.edge_network != "full":
            aggregated = nn.Dense(self.dim, use_bias=False, name="U")(aggregated)
        root = nn.Dense(self.dim, name="root")(h)
        return root + aggregated


def graph_sum(x: jax.Array, graph: GraphBatch, ops: str) -> jax.Array:
    """Sum of node rows per molecule, ``(N, ...) -> (B, ...)``."""
    if ops == "segment":
        b = graph.num_graphs
        return jax.ops.segment_sum(x, graph.node_graph, b, indices_are_sorted=True)
    return x.reshape(graph.num_graphs, A, *x.shape[1:]).sum(axis=1)


def graph_max(x: jax.Array, graph: GraphBatch, ops: str) -> jax.Array:
    """Max of node values per molecule, ``(N,) -> (B,)``."""
    if ops == "segment":
        b = graph.num_graphs
        return jax.ops.segment_max(x, graph.node_graph, b, indices_are_sorted=True)
    return x.reshape(graph.num_graphs, A).max(axis=1)


def to_nodes(x: jax.Array, graph: GraphBatch, ops: str) -> jax.Array:
    """Each node's molecule's row, ``(B, ...) -> (N, ...)``."""
    if ops == "segment":
        return x[graph.node_graph]
    return jnp.repeat(x, A, axis=0, total_repeat_length=graph.num_nodes)


class Set2Set(nn.Module):
    """Set2Set readout (Vinyals et al. 2016) with a softmax over each molecule's atoms."""

    dim: int
    steps: int = 3
    ops: str = "segment"

    @nn.compact
    def __call__(self, h: jax.Array, graph: GraphBatch) -> jax.Array:
        b = graph.num_graphs
        cell = nn.OptimizedLSTMCell(self.dim, name="lstm")
        carry = (jnp.zeros((b, self.dim), h.dtype), jnp.zeros((b, self.dim), h.dtype))
        q_star = jnp.zeros((b, 2 * self.dim), h.dtype)
        for _ in range(self.steps):
            carry, q = cell(carry, q_star)
            score = jnp.sum(h * to_nodes(q, graph, self.ops), axis=-1)
            score = jnp.where(graph.node_mask, score, -jnp.inf)
            # Every molecule has a real atom, so its max is finite.
            top = jax.lax.stop_gradient(graph_max(score, graph, self.ops))
            a = jnp.exp(score - to_nodes(top, graph, self.ops)) * graph.node_mask
            a = a / to_nodes(graph_sum(a, graph, self.ops), graph, self.ops)
            r = graph_sum(a[:, None] * h, graph, self.ops)
            q_star = jnp.concatenate([q, r], axis=-1)
        return q_star


class Trunk(nn.Module):
    """The shared part: embedding, ``num_steps`` x (EdgeConv + GRU), Set2Set, dense."""

    dim: int = 64
    num_steps: int = 3
    edge_hidden: int = 128
    edge_network: str = "factorised"
    set2set_steps: int = 3
    ops: str = "segment"

    @nn.compact
    def __call__(self, graph: GraphBatch) -> jax.Array:
        if self.edge_network not in ("full", "factorised"):
            raise ValueError(
                f"edge_network must be 'full' or 'factorised', got {self.edge_network!r}."
            )
        out = nn.relu(nn.Dense(self.dim, name="embed")(graph.nodes))
        width = self.dim * self.dim if self.edge_network == "full" else self.dim
        weights = nn.Dense(self.edge_hidden, name="edge_mlp_0")(graph.edges)
        weights = nn.Dense(width, name="edge_mlp_1")(nn.relu(weights))
        conv = EdgeConv(self.dim, self.edge_network, self.ops, name="conv")
        gru = nn.GRUCell(self.dim, name="gru")
        h = out
        for _ in range(self.num_steps):
            m = nn.relu(conv(out, weights, graph))
            h, out = gru(h, m)
        pooled = Set2Set(self.dim, self.set2set_steps, self.ops, name="set2set")(out, graph)
        return nn.relu(nn.Dense(self.dim, name="dense")(pooled))


class TaskHeads(nn.Module):
    """``num_tasks`` linear heads stored stacked; output ``(num_tasks, B)``."""

    num_tasks: int

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        init = nn.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))
        kernel = self.param("kernel", init, (self.num_tasks, features.shape[-1], 1))
        bias = self.param("bias", nn.initializers.zeros, (self.num_tasks, 1))
        return (jnp.einsum("bf,kfo->kbo", features, kernel) + bias[:, None, :])[..., 0]


class MPNN(nn.Module):
    """Trunk + heads; parameters ``{"trunk": ..., "heads": ...}``; output ``(k, B)``."""

    num_tasks: int
    dim: int = 64
    num_steps: int = 3
    edge_hidden: int = 128
    edge_network: str = "factorised"
    ops: str = "segment"

    def setup(self):
        self.trunk = Trunk(
            self.dim, self.num_steps, self.edge_hidden, self.edge_network, ops=self.ops
        )
        self.heads = TaskHeads(self.num_tasks)

    def __call__(self, graph: GraphBatch) -> jax.Array:
        return self.heads(self.trunk(graph))

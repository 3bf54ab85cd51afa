"""The real-QM9 benchmark (benchmarks/qm9) on a slice of qm9pack's molecules.

The whole path on the first molecules of qm9pack's first CSV file: the
loader (targets in the paper's units, heavy-atom graphs), the ``.npz`` cache,
fixed-shape graph batches, and ``python -m benchmarks.qm9 --quick`` with one
loss weighting (FAMO) and one aggregator (IMTL-G) besides STL, down to the
Δm% tables it writes.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

pd = pytest.importorskip("pandas")
pytest.importorskip("flax")

from benchmarks.qm9 import data as qm9_data  # noqa: E402
from benchmarks.qm9 import model as qm9_model  # noqa: E402

NUM_SLICE = 600  # the --quick run needs 256 + 128 + 128 molecules


@pytest.fixture(scope="module")
def frame():
    if importlib.util.find_spec("qm9pack") is None:
        pytest.skip("qm9pack is not installed (pip install -e '.[qm9]')")
    path = qm9_data.qm9pack_data_dir() / "qm9_part1.csv"
    use = list(qm9_data.STRUCTURE_COLUMNS + qm9_data.PROPERTY_COLUMNS)
    return pd.read_csv(path, usecols=use, nrows=NUM_SLICE)


@pytest.fixture(scope="module")
def molecules(frame):
    mols = qm9_data.molecules_from_columns({c: frame[c].to_numpy() for c in frame.columns})
    order = np.random.default_rng(0).permutation(NUM_SLICE).astype(np.int32)
    split = {"test": order[:128], "val": order[128:256], "train": order[256:]}
    return dataclasses.replace(mols, split=split)


def test_missing_qm9pack_names_the_install_command(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "qm9pack" else real_find_spec(name, *a),
    )
    with pytest.raises(qm9_data.MissingDependencyError, match=r"pip install -e \"\.\[qm9\]\""):
        qm9_data.load_qm9(tmp_path)  # no cache there, so qm9pack is needed


def test_targets_in_the_papers_units(frame, molecules):
    assert molecules.targets.shape == (NUM_SLICE, qm9_data.NUM_TARGETS)
    assert np.all(np.isfinite(molecules.targets))
    col = {name: i for i, name in enumerate(qm9_data.TARGET_NAMES)}
    ha = qm9_data.HARTREE_TO_MEV
    np.testing.assert_allclose(molecules.targets[:, col["homo"]], frame["HOMO_au"] * ha)
    np.testing.assert_allclose(molecules.targets[:, col["mu"]], frame["Dipole_debye"])
    # Atomization energy, recomputed from the element strings: E_mol - sum E_atom.
    for row in (0, 1, NUM_SLICE - 1):
        elements = frame["Elements"][row].strip("[]").replace("'", "").split(",")
        free_atoms = sum(qm9_data.ATOM_REFERENCE_HARTREE[e.strip()][0] for e in elements)
        expected = (frame["InternalEnergy_0K_au"][row] - free_atoms) * ha
        np.testing.assert_allclose(molecules.targets[row, col["U0"]], expected, rtol=1e-12)
    assert np.all(molecules.targets[:, col["U0"]] < 0)  # bound molecules


def test_heavy_atom_graphs(frame, molecules):
    counts = molecules.element_counts
    np.testing.assert_array_equal(counts.sum(axis=1), frame["N_atoms"])
    np.testing.assert_array_equal(molecules.num_heavy, counts[:, 1:].sum(axis=1))
    # Every hydrogen is counted on exactly one heavy atom; padding slots are empty.
    np.testing.assert_array_equal(molecules.num_hydrogens.sum(axis=1), counts[:, 0])
    slots = np.arange(qm9_data.MAX_HEAVY_ATOMS)
    padding = slots[None, :] >= molecules.num_heavy[:, None]
    assert np.all((molecules.atom_type > 0) == ~padding)
    assert np.all(molecules.positions[padding] == 0)


def test_cache_round_trip_without_qm9pack(molecules, tmp_path, monkeypatch):
    qm9_data.save_cache(molecules, qm9_data._cache_file(tmp_path))

    def no_reading():
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(qm9_data, "read_qm9pack", no_reading)
    loaded, path = qm9_data.load_qm9(tmp_path)
    assert path.parent == tmp_path
    for field in dataclasses.fields(qm9_data.QM9Molecules):
        if field.name != "split":
            np.testing.assert_array_equal(
                getattr(loaded, field.name), getattr(molecules, field.name)
            )
    for name, idx in molecules.split.items():
        np.testing.assert_array_equal(loaded.split[name], idx)
    assert qm9_data.fingerprint(loaded) == qm9_data.fingerprint(molecules)


def test_graph_batches_have_fixed_shapes(molecules):
    arrays = qm9_model.MoleculeArrays(
        atom_type=jnp.asarray(molecules.atom_type, jnp.int32),
        num_hydrogens=jnp.asarray(molecules.num_hydrogens, jnp.int32),
        positions=jnp.asarray(molecules.positions),
        targets=jnp.asarray(molecules.targets, jnp.float32),
    )
    batch = chex.assert_max_traces(qm9_model.make_graph_batch, n=1)
    batch = jax.jit(batch)
    a = qm9_model.A
    # Molecules of different sizes (1 to 9 heavy atoms) in the same shapes: one trace.
    small, big = np.argsort(molecules.num_heavy)[:8], np.argsort(molecules.num_heavy)[-8:]
    for idx in (small, big):
        graph, targets = batch(arrays, jnp.asarray(idx, jnp.int32))
        assert graph.nodes.shape == (8 * a, qm9_model.NODE_FEATURES)
        assert graph.edges.shape == (8 * qm9_model.EDGES_PER_MOLECULE, qm9_model.EDGE_FEATURES)
        assert targets.shape == (8, qm9_data.NUM_TARGETS)
        real = np.asarray(molecules.atom_type[idx] > 0).reshape(-1)
        np.testing.assert_array_equal(np.asarray(graph.node_mask), real)
        senders, receivers = np.asarray(graph.senders), np.asarray(graph.receivers)
        assert np.all(senders != receivers) and np.all(senders // a == receivers // a)
        np.testing.assert_array_equal(np.asarray(graph.edge_mask), real[senders] & real[receivers])
        assert not np.any(np.asarray(graph.edges)[~np.asarray(graph.edge_mask)])
        # Degree per real atom: each real molecule is a complete graph.
        per_node = np.bincount(receivers[np.asarray(graph.edge_mask)], minlength=8 * a)
        heavy = np.repeat(molecules.num_heavy[idx], a)
        np.testing.assert_array_equal(per_node[real], (heavy - 1)[real])


def test_quick_run_end_to_end(molecules, tmp_path, monkeypatch):
    from benchmarks.qm9.__main__ import main

    cache, out = tmp_path / "cache", tmp_path / "out"
    qm9_data.save_cache(molecules, qm9_data._cache_file(cache))
    summary = main(
        ["--quick", "--cache", str(cache), "--out", str(out), "--progress", "none"]
        + ["--methods", "FAMO", "IMTL-G", "--seeds", "2", "--epochs", "1"]
    )
    assert list(summary.rows) == ["STL", "FAMO", "IMTL-G"]
    k = qm9_data.NUM_TARGETS
    for name, row in summary.rows.items():
        assert row.test_mae_best.shape == (2, k), name
        assert np.all(np.isfinite(row.test_mae_best)) and np.all(row.test_mae_best > 0), name
    # Δm% is the mean relative MAE change against STL, per seed.
    famo = summary.rows["FAMO"].test_mae_best
    stl = summary.rows["STL"].test_mae_best.mean(axis=0)
    np.testing.assert_allclose(
        summary.delta_m("FAMO"), 100 * (np.mean(famo / stl, axis=1) - 1), atol=1e-4
    )
    weights = summary.rows["FAMO"].task_weights
    np.testing.assert_allclose(weights.sum(axis=-1), 1.0, rtol=1e-5)
    text = (out / "qm9.md").read_text()
    assert text.startswith("**SMOKE TEST (--quick)")
    assert "| FAMO |" in text and "| IMTL-G |" in text and "Partial" not in text
    with np.load(out / "qm9_results.npz") as saved:
        np.testing.assert_array_equal(saved["IMTL-G/test_mae_best"], row.test_mae_best)
    # A second invocation reuses the saved rows (same settings) instead of training them.
    again = main(
        ["--quick", "--cache", str(cache), "--out", str(tmp_path / "again"), "--progress", "none"]
        + ["--methods", "FAMO", "IMTL-G", "--seeds", "2", "--epochs", "1"]
        + ["--reuse-from", str(out)]
    )
    for name, row in summary.rows.items():
        np.testing.assert_array_equal(again.rows[name].test_mae_best, row.test_mae_best)
        np.testing.assert_array_equal(again.rows[name].best_epoch, row.best_epoch)
    # Reuse is keyed on the task-gradient path: IMTL-G was trained with the
    # engine, so a jacrev invocation trains it again (stopped here) ...
    assert summary.rows["IMTL-G"].task_gradients == "engine"
    assert summary.rows["FAMO"].task_gradients is None
    trained = []

    def no_training(self, method, *args, **kwargs):
        trained.append(method.name)
        raise KeyboardInterrupt

    args = ["--quick", "--cache", str(cache), "--progress", "none", "--seeds", "2"]
    args += ["--epochs", "1", "--methods", "FAMO", "IMTL-G", "--reuse-from", str(out)]
    args += ["--gradients", "jacrev"]
    with monkeypatch.context() as patch:
        patch.setattr("benchmarks.qm9.train.Trainer.train", no_training)
        with pytest.raises(KeyboardInterrupt):
            main([*args, "--out", str(tmp_path / "jacrev")])
        assert trained == ["IMTL-G"]
        # ... unless told to reuse either path.
        either = main([*args, "--out", str(tmp_path / "either"), "--reuse-either-gradients"])
    assert either.rows["IMTL-G"].task_gradients == "engine"
    np.testing.assert_array_equal(
        either.rows["IMTL-G"].test_mae_best, summary.rows["IMTL-G"].test_mae_best
    )


def test_engine_and_jacrev_give_the_same_first_update(molecules):
    # The Gramian engine (trunk mask inside, heads the mean gradient) and
    # jacrev + shared_trunk: the same aggregator update, times k, on one batch.
    from benchmarks._mtl_bench import method_registry
    from benchmarks.qm9.__main__ import QUICK
    from benchmarks.qm9.train import Trainer, make_splits

    cfg = dataclasses.replace(QUICK, num_seeds=1)
    splits = make_splits(molecules, cfg)
    method = method_registry()["MGDA"]
    key = jax.random.key(0)
    batch = jnp.arange(cfg.batch_size)
    updates = {}
    for gradients in ("engine", "jacrev"):
        trainer = Trainer(splits, cfg, gradients)
        assert trainer.gradients_for(method) == gradients
        params = trainer._init_one(key, trainer._example_graph)
        transform, _ = trainer._build(method, key, None, jnp.float32(cfg.learning_rate))
        value_and_task_grads = trainer.task_gradient_fn(method)

        @jax.jit
        def first_update(params, value_and_task_grads=value_and_task_grads, transform=transform):
            losses, task_grads = value_and_task_grads(params, splits.train, batch)
            return transform.update(task_grads, transform.init(params), params, losses=losses)[0]

        updates[gradients] = first_update(params)
    assert set(updates["engine"]) == {"trunk", "heads"}
    assert any(bool(jnp.any(leaf != 0)) for leaf in jax.tree.leaves(updates["engine"]["trunk"]))
    chex.assert_trees_all_close(updates["engine"], updates["jacrev"], rtol=1e-5, atol=1e-5)
    # A row without a Gramian form (DB-MTL) falls back to jacrev.
    assert Trainer(splits, cfg, "engine").gradients_for(method_registry()["DB-MTL"]) == "jacrev"

"""QM9 from the PyPI package ``qm9pack``: targets, heavy-atom graphs, a fixed split, a cache.

``qm9pack`` (MIT licence) ships the 130,831 molecules of QM9 (Ramakrishnan et
al. 2014: the 133,885 molecules minus the 3,054 whose geometry failed the
consistency check, the same set as PyTorch Geometric's ``QM9``) as three CSV
files in its ``data/`` directory. They are read once with pandas and turned
into a compact ``.npz`` cache (a few MB), so later runs start in seconds and
need neither pandas nor qm9pack.

Targets (the FAMO / Nash-MTL trainers' 11 targets, in the units of the
paper's Table 2):

========  ==========================================  ===========================
name      QM9 property (qm9pack column)               unit
========  ==========================================  ===========================
mu        dipole moment (``Dipole_debye``)            D
alpha     isotropic polarizability                    a0^3 (bohr^3)
homo      HOMO energy (``HOMO_au``)                   meV
lumo      LUMO energy (``LUMO_au``)                   meV
r2        electronic spatial extent (``R2_bohr2``)    a0^2
zpve      zero-point vibrational energy               meV
U0        atomization energy at 0 K                   meV
U         atomization energy at 298.15 K              meV
H         atomization enthalpy at 298.15 K            meV
G         atomization free energy at 298.15 K         meV
Cv        heat capacity at 298.15 K                   cal/(mol K)
========  ==========================================  ===========================

The authors' trainer takes PyG's targets ``[0, 1, 2, 3, 5, 6, 12, 13, 14, 15,
11]`` (the gap, target 4, is left out) in PyG's units (eV) and multiplies the
MAE of homo, lumo, zpve, U0, U, H, G by 1000 to report meV. Targets 12-15 are
the *atomization* energies: the molecule's total energy minus the energies of
its free atoms, ``E_mol - sum_atoms E_atom``, with the atom reference energies
of QM9's ``atomref`` table (B3LYP/6-31G(2df,p), :data:`ATOM_REFERENCE_HARTREE`).
Here the Hartree values are converted with CODATA's 1 Ha = 27.211386246 eV
(PyG's ``HAR2EV``); PyG's atomization targets come from DeepChem's CSV in
kcal/mol times 0.04336414 eV/(kcal/mol), which agrees with this to about 1e-6
relative (0.02 meV on a typical U0 of -70 eV), far below any MAE reported.

Graphs: the **heavy-atom skeleton** from the XYZ coordinates. Nodes are the C,
N, O and F atoms (at most 9 per molecule, 8.8 on average); every hydrogen is
assigned to its nearest heavy atom and counted in that atom's features. Edges
join every ordered pair of distinct heavy atoms (a complete graph, as the
authors' ``Complete()`` transform builds) and carry the interatomic distance
(see :mod:`benchmarks.qm9.model` for the features). Why not SMILES bonds and
why not all atoms: the properties are those of the DFT equilibrium geometry
that the XYZ coordinates give (no SMILES-to-XYZ atom mapping to get wrong, no
RDKit), and dropping the hydrogens as nodes halves the nodes and cuts the
edges of the complete graph from about 300 to about 70 per molecule, which is
what makes the benchmark fit a 2-core CPU.

Split (fixed): a permutation of the 130,831 molecules drawn with
``numpy.random.default_rng(0)``; the first 10,000 are the test set, the next
10,000 the validation set, the remaining 110,831 the training set (the
authors' 10k / 10k / rest on a shuffled PyG dataset). A CPU-scale run uses
prefixes of these three index lists, so smaller runs use subsets of larger
ones and never mix the splits.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
import pathlib
import time
from collections.abc import Mapping, Sequence

import numpy as np

TARGET_NAMES = ("mu", "alpha", "homo", "lumo", "r2", "zpve", "U0", "U", "H", "G", "Cv")
TARGET_UNITS = ("D", "a0^3", "meV", "meV", "a0^2", "meV", "meV", "meV", "meV", "meV", "cal/mol/K")
NUM_TARGETS = len(TARGET_NAMES)
# 1 Hartree in meV (CODATA 2018, PyG's HAR2EV = 27.211386246 eV).
HARTREE_TO_MEV = 27211.386246
ELEMENTS = ("H", "C", "N", "O", "F")
HEAVY_ELEMENTS = ELEMENTS[1:]
MAX_HEAVY_ATOMS = 9
# QM9's atomref table (Ramakrishnan et al. 2014, B3LYP/6-31G(2df,p)): energies
# of the free atoms in Hartree for U0 (0 K), U, H and G (298.15 K).
ATOM_REFERENCE_HARTREE = {
    "H": (-0.500273, -0.498857, -0.497912, -0.510927),
    "C": (-37.846772, -37.845355, -37.844411, -37.861317),
    "N": (-54.583861, -54.582445, -54.581501, -54.598897),
    "O": (-75.064579, -75.063162, -75.062219, -75.079532),
    "F": (-99.718730, -99.717314, -99.716370, -99.733544),
}
# The qm9pack columns read, in the order of the raw properties below.
ENERGY_COLUMNS = (
    "InternalEnergy_0K_au",
    "InternalEnergy_298K_au",
    "Enthalphy_298K_au",  # sic: qm9pack's spelling
    "GibbsFreeEnergy_298K_au",
)
PROPERTY_COLUMNS = (
    "Dipole_debye",
    "Polarizability_bohr3",
    "HOMO_au",
    "LUMO_au",
    "R2_bohr2",
    "ZPVE_au",
    *ENERGY_COLUMNS,
    "Heatcapacity_Cv_cal_mol_K",
)
STRUCTURE_COLUMNS = ("Index", "N_atoms", "Elements", "XYZ_Ang")
NUM_MOLECULES = 130_831
NUM_TEST = 10_000
NUM_VAL = 10_000
SPLIT_SEED = 0
# Bump when the cached arrays change meaning.
CACHE_VERSION = 1
INSTALL_HINT = (
    'Real QM9 needs the optional dependencies qm9pack and pandas: pip install -e ".[qm9]" '
    "(from the famo_jax repository root; qm9pack is a 104 MB wheel with the molecules)."
)


class MissingDependencyError(ImportError):
    """qm9pack or pandas is not installed (the message names the install command)."""


@dataclasses.dataclass(frozen=True)
class QM9Molecules:
    """Every QM9 molecule as fixed-shape arrays (the content of the cache).

    ``M`` is the number of molecules (130,831 for the full set) and ``A =
    MAX_HEAVY_ATOMS = 9``. Heavy-atom slots ``>= num_heavy[m]`` are padding.

    Attributes:
      index: ``(M,)`` int32, QM9's molecule number (1..133,885; ``dsgdb9nsd_<index>``).
      targets: ``(M, 11)`` float64, :data:`TARGET_NAMES` in :data:`TARGET_UNITS`.
      total_energies: ``(M, 4)`` float64, U0, U, H, G total energies in Hartree.
      element_counts: ``(M, 5)`` int16, atoms of each of :data:`ELEMENTS` (H, C, N, O, F).
      num_heavy: ``(M,)`` int8, heavy atoms (1..9).
      atom_type: ``(M, A)`` int8, 1..4 for C, N, O, F; 0 in padding slots.
      num_hydrogens: ``(M, A)`` int8, hydrogens whose nearest heavy atom this is.
      positions: ``(M, A, 3)`` float32, heavy-atom coordinates in Å (0 in padding).
      split: name -> int32 indices into the molecule axis (``"train"``, ``"val"``,
        ``"test"``), see the module docstring.
    """

    index: np.ndarray
    targets: np.ndarray
    total_energies: np.ndarray
    element_counts: np.ndarray
    num_heavy: np.ndarray
    atom_type: np.ndarray
    num_hydrogens: np.ndarray
    positions: np.ndarray
    split: Mapping[str, np.ndarray]

    @property
    def num_molecules(self) -> int:
        return int(self.index.shape[0])

    def subset(self, indices: np.ndarray) -> QM9Molecules:
        """The molecules at ``indices`` (the split is dropped: it indexes the full set)."""
        take = lambda a: np.asarray(a)[indices]
        return QM9Molecules(
            index=take(self.index),
            targets=take(self.targets),
            total_energies=take(self.total_energies),
            element_counts=take(self.element_counts),
            num_heavy=take(self.num_heavy),
            atom_type=take(self.atom_type),
            num_hydrogens=take(self.num_hydrogens),
            positions=take(self.positions),
            split={},
        )


# ----------------------------------------------------------------------------
# Targets.


def atomization_energies_mev(
    total_energies_hartree: np.ndarray, element_counts: np.ndarray
) -> np.ndarray:
    """``(E_mol - sum_atoms E_atom)`` in meV for U0, U, H, G.

    Args:
      total_energies_hartree: ``(M, 4)`` total U0, U, H, G in Hartree.
      element_counts: ``(M, 5)`` numbers of H, C, N, O, F atoms.

    Returns:
      ``(M, 4)`` float64 atomization energies in meV (negative: a bound
      molecule is lower in energy than its free atoms).
    """
    reference = np.array([ATOM_REFERENCE_HARTREE[e] for e in ELEMENTS], np.float64)  # (5, 4)
    atoms = np.asarray(element_counts, np.float64) @ reference
    return (np.asarray(total_energies_hartree, np.float64) - atoms) * HARTREE_TO_MEV


def build_targets(properties: np.ndarray, element_counts: np.ndarray) -> np.ndarray:
    """The 11 targets of :data:`TARGET_NAMES` from the raw qm9pack properties.

    Args:
      properties: ``(M, 11)`` float64 columns :data:`PROPERTY_COLUMNS` (mu in D,
        alpha in a0^3, HOMO, LUMO, ZPVE and the four total energies in
        Hartree, R2 in a0^2, Cv in cal/(mol K)).
      element_counts: ``(M, 5)`` numbers of H, C, N, O, F atoms.

    Returns:
      ``(M, 11)`` float64 targets in :data:`TARGET_UNITS`.
    """
    p = np.asarray(properties, np.float64)
    mu, alpha, homo, lumo, r2, zpve = (p[:, j] for j in range(6))
    energies = p[:, 6:10]
    cv = p[:, 10]
    atomization = atomization_energies_mev(energies, element_counts)
    columns = [
        mu,
        alpha,
        homo * HARTREE_TO_MEV,
        lumo * HARTREE_TO_MEV,
        r2,
        zpve * HARTREE_TO_MEV,
        *atomization.T,
        cv,
    ]
    return np.stack(columns, axis=1)


# ----------------------------------------------------------------------------
# Structures.


def _parse_number_lists(strings: Sequence[str]) -> np.ndarray:
    """All numbers of strings like ``"[[-0.01,1.08,0.],[0.002,...]]"``, concatenated."""
    joined = ",".join(strings)
    for char in "[]'\" ":
        joined = joined.replace(char, "")
    return np.array(joined.split(","), np.float64)


def _parse_element_lists(strings: Sequence[str]) -> list[str]:
    joined = ",".join(strings)
    for char in "[]'\" ":
        joined = joined.replace(char, "")
    return joined.split(",")


def heavy_atom_graphs(
    elements: Sequence[str], positions: np.ndarray, num_atoms: np.ndarray
) -> dict[str, np.ndarray]:
    """Heavy-atom arrays of every molecule (see :class:`QM9Molecules`).

    Args:
      elements: the element symbols of all atoms of all molecules, concatenated.
      positions: ``(sum(num_atoms), 3)`` coordinates in Å, in the same order.
      num_atoms: ``(M,)`` atoms per molecule, hydrogens included.

    Returns:
      A dict with ``element_counts``, ``num_heavy``, ``atom_type``,
      ``num_hydrogens`` and ``positions`` as in :class:`QM9Molecules`.

    Raises:
      ValueError: on an unknown element, a molecule without heavy atoms or
        with more than :data:`MAX_HEAVY_ATOMS`, or inconsistent lengths.
    """
    num_atoms = np.asarray(num_atoms, np.int64)
    positions = np.asarray(positions, np.float64)
    code = {e: i for i, e in enumerate(ELEMENTS)}
    unknown = sorted(set(elements) - set(code))
    if unknown:
        raise ValueError(f"unknown elements {unknown}; QM9 has only {ELEMENTS}.")
    if len(elements) != num_atoms.sum() or positions.shape != (num_atoms.sum(), 3):
        raise ValueError(
            f"{len(elements)} elements and {positions.shape[0]} positions for "
            f"sum(num_atoms) = {num_atoms.sum()} atoms."
        )
    z = np.array([code[e] for e in elements], np.int64)  # 0 = H
    m = num_atoms.shape[0]
    molecule = np.repeat(np.arange(m), num_atoms)
    element_counts = np.zeros((m, len(ELEMENTS)), np.int16)
    np.add.at(element_counts, (molecule, z), 1)
    num_heavy = element_counts[:, 1:].sum(axis=1)
    if num_heavy.min() < 1 or num_heavy.max() > MAX_HEAVY_ATOMS:
        raise ValueError(
            f"molecules must have 1..{MAX_HEAVY_ATOMS} heavy atoms, got "
            f"{num_heavy.min()}..{num_heavy.max()}."
        )
    heavy = z > 0
    # Slot of each heavy atom within its molecule (order of the XYZ file).
    heavy_rank = np.cumsum(heavy) - 1
    first_heavy = np.concatenate([[0], np.cumsum(num_heavy)[:-1]])
    slot = heavy_rank - first_heavy[molecule]
    atom_type = np.zeros((m, MAX_HEAVY_ATOMS), np.int8)
    heavy_positions = np.zeros((m, MAX_HEAVY_ATOMS, 3), np.float32)
    atom_type[molecule[heavy], slot[heavy]] = z[heavy]
    heavy_positions[molecule[heavy], slot[heavy]] = positions[heavy]
    # Each hydrogen belongs to its nearest heavy atom (its bonding partner: QM9
    # has no H2 and no bridging hydrogens).
    hydrogens = np.flatnonzero(~heavy)
    h_mol = molecule[hydrogens]
    diff = positions[hydrogens][:, None, :] - heavy_positions[h_mol].astype(np.float64)
    dist = np.linalg.norm(diff, axis=-1)
    dist[atom_type[h_mol] == 0] = np.inf
    nearest = np.argmin(dist, axis=1)
    num_hydrogens = np.zeros((m, MAX_HEAVY_ATOMS), np.int8)
    np.add.at(num_hydrogens, (h_mol, nearest), 1)
    return dict(
        element_counts=element_counts,
        num_heavy=num_heavy.astype(np.int8),
        atom_type=atom_type,
        num_hydrogens=num_hydrogens,
        positions=heavy_positions,
    )


def fixed_split(
    num_molecules: int = NUM_MOLECULES, seed: int = SPLIT_SEED
) -> dict[str, np.ndarray]:
    """Test / validation / training indices (10k / 10k / rest of a seeded permutation)."""
    if num_molecules <= NUM_TEST + NUM_VAL:
        raise ValueError(f"num_molecules must exceed {NUM_TEST + NUM_VAL}, got {num_molecules}.")
    order = np.random.default_rng(seed).permutation(num_molecules).astype(np.int32)
    return {
        "test": order[:NUM_TEST],
        "val": order[NUM_TEST : NUM_TEST + NUM_VAL],
        "train": order[NUM_TEST + NUM_VAL :],
    }


def molecules_from_columns(columns: Mapping[str, Sequence]) -> QM9Molecules:
    """Builds :class:`QM9Molecules` from qm9pack's columns (a DataFrame or a dict of lists).

    Args:
      columns: at least :data:`STRUCTURE_COLUMNS` and :data:`PROPERTY_COLUMNS`,
        one entry per molecule, in qm9pack's formats (``Elements`` like
        ``"['C','H']"``, ``XYZ_Ang`` like ``"[[x,y,z],[x,y,z]]"`` in Å).

    Returns:
      The molecules; the split is :func:`fixed_split` when there are all
      130,831 of them, otherwise a split of the same 10k/10k/rest kind is not
      possible and ``split`` is empty.
    """
    index = np.asarray(columns["Index"], np.int32)
    num_atoms = np.asarray(columns["N_atoms"], np.int64)
    elements = _parse_element_lists(list(columns["Elements"]))
    positions = _parse_number_lists(list(columns["XYZ_Ang"])).reshape(-1, 3)
    graphs = heavy_atom_graphs(elements, positions, num_atoms)
    properties = np.stack([np.asarray(columns[c], np.float64) for c in PROPERTY_COLUMNS], axis=1)
    targets = build_targets(properties, graphs["element_counts"])
    split = fixed_split(len(index)) if len(index) == NUM_MOLECULES else {}
    return QM9Molecules(
        index=index,
        targets=targets,
        total_energies=properties[:, 6:10],
        split=split,
        **graphs,
    )


# ----------------------------------------------------------------------------
# qm9pack, pandas and the cache.


def qm9pack_data_dir() -> pathlib.Path:
    """The directory of qm9pack's CSV files, found without importing qm9pack.

    (qm9pack's ``__init__`` imports ``pkg_resources``, which recent setuptools
    no longer ship, so the package is located through its import spec.)

    Raises:
      MissingDependencyError: if qm9pack is not installed.
    """
    spec = importlib.util.find_spec("qm9pack")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(INSTALL_HINT)
    data_dir = pathlib.Path(list(spec.submodule_search_locations)[0]) / "data"
    if not (data_dir / "qm9_part1.csv").is_file():
        raise MissingDependencyError(
            f"qm9pack is installed but {data_dir} has no qm9_part1.csv. {INSTALL_HINT}"
        )
    return data_dir


def read_qm9pack() -> QM9Molecules:
    """Reads qm9pack's three CSV files (about 4 s) and builds every molecule (about 10 s)."""
    data_dir = qm9pack_data_dir()
    try:
        import pandas as pd
    except ImportError as error:
        raise MissingDependencyError(INSTALL_HINT) from error
    use = list(STRUCTURE_COLUMNS + PROPERTY_COLUMNS)
    frames = [pd.read_csv(data_dir / f"qm9_part{i}.csv", usecols=use) for i in (1, 2, 3)]
    frame = pd.concat(frames, ignore_index=True).sort_values("Index", kind="stable")
    if len(frame) != NUM_MOLECULES:
        raise ValueError(f"qm9pack has {len(frame)} molecules, expected {NUM_MOLECULES}.")
    return molecules_from_columns({c: frame[c].to_numpy() for c in use})


def default_cache_dir() -> pathlib.Path:
    """``$FAMO_JAX_CACHE``, else ``$XDG_CACHE_HOME/famo_jax``, else ``~/.cache/famo_jax``."""
    if os.environ.get("FAMO_JAX_CACHE"):
        return pathlib.Path(os.environ["FAMO_JAX_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "famo_jax"


def _cache_file(cache_dir: pathlib.Path) -> pathlib.Path:
    return pathlib.Path(cache_dir) / f"qm9_heavy_atoms_v{CACHE_VERSION}.npz"


_FIELDS = tuple(f.name for f in dataclasses.fields(QM9Molecules) if f.name != "split")


def save_cache(molecules: QM9Molecules, path: pathlib.Path) -> None:
    """Writes the molecules to ``path`` (an ``.npz``) atomically."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {name: getattr(molecules, name) for name in _FIELDS}
    arrays.update({f"split_{name}": idx for name, idx in molecules.split.items()})
    arrays["version"] = np.array(CACHE_VERSION)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


def load_cache(path: pathlib.Path) -> QM9Molecules:
    """Reads a cache written by :func:`save_cache`."""
    with np.load(path) as f:
        if int(f["version"]) != CACHE_VERSION:
            raise ValueError(f"{path} has cache version {int(f['version'])}, not {CACHE_VERSION}.")
        fields = {name: f[name] for name in _FIELDS}
        split = {k[len("split_") :]: f[k] for k in f.files if k.startswith("split_")}
    return QM9Molecules(split=split, **fields)


def load_qm9(
    cache_dir: str | os.PathLike | None = None, log=print
) -> tuple[QM9Molecules, pathlib.Path]:
    """All QM9 molecules, from the cache if there is one (else read and cached).

    Args:
      cache_dir: where the ``.npz`` lives (default :func:`default_cache_dir`).
      log: called with one line when the cache is built.

    Returns:
      ``(molecules, cache_path)``.

    Raises:
      MissingDependencyError: if there is no cache and qm9pack or pandas is
        missing.
    """
    path = _cache_file(pathlib.Path(cache_dir) if cache_dir else default_cache_dir())
    if path.is_file():
        return load_cache(path), path
    start = time.perf_counter()
    molecules = read_qm9pack()
    save_cache(molecules, path)
    log(
        f"built the QM9 cache {path} from qm9pack in {time.perf_counter() - start:.0f} s "
        f"({path.stat().st_size / 1e6:.1f} MB)"
    )
    return molecules, path


def fingerprint(molecules: QM9Molecules) -> str:
    """A short hash of the arrays, printed with results so runs can be matched to data."""
    h = hashlib.sha256()
    for name in _FIELDS:
        h.update(np.ascontiguousarray(getattr(molecules, name)).tobytes())
    return h.hexdigest()[:12]

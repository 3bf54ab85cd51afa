"""Timing, memory and recompilation utilities shared by the famo_jax benchmarks.

Everything here is plain JAX; no benchmark result is computed or stored here.

- :func:`machine_info` describes the machine and software the numbers come from,
  so each script's output is self-contained.
- :class:`CompileCounter` counts JAX traces and XLA compilations through
  ``jax.monitoring`` events; the benchmarks wrap every timed loop in one and
  report (and fail loudly) if anything was traced or compiled inside it.
- :func:`compile_step` compiles a step function ahead of time and returns it
  with XLA's compiled memory analysis (:class:`MemoryStats`).
- :func:`time_steps` and :func:`time_interleaved` time jitted steps that feed
  their output back as their next input (as a training loop does), with
  ``block_until_ready`` after every call, after a warm-up.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

# jax.monitoring event names (jax >= 0.4.30) recorded once per trace and once
# per backend (XLA) compilation of a jitted function.
TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"

_EVENT_COUNTS = {TRACE_EVENT: 0, COMPILE_EVENT: 0}
_LISTENER_INSTALLED = False


def _on_duration_event(event: str, duration_secs: float, **kwargs: Any) -> None:
    del duration_secs, kwargs
    if event in _EVENT_COUNTS:
        _EVENT_COUNTS[event] += 1


def _install_listener() -> None:
    global _LISTENER_INSTALLED
    if not _LISTENER_INSTALLED:
        jax.monitoring.register_event_duration_secs_listener(_on_duration_event)
        _LISTENER_INSTALLED = True


class RecompilationError(RuntimeError):
    """A timed loop traced or compiled something: its timings would be wrong."""


class CompileCounter:
    """Counts traces and XLA compilations inside a ``with`` block.

    Example::

        with CompileCounter("LS k=10") as counter:
            ...  # timed loop
        # leaving the block raises RecompilationError if counter.traces or
        # counter.compiles is non-zero (pass strict=True to only record).
    """

    def __init__(self, label: str = "timed loop", strict: bool = True):
        self.label = label
        self.strict = strict
        self.traces = 0
        self.compiles = 0

    def __enter__(self) -> CompileCounter:
        _install_listener()
        self._start = dict(_EVENT_COUNTS)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.traces = _EVENT_COUNTS[TRACE_EVENT] - self._start[TRACE_EVENT]
        self.compiles = _EVENT_COUNTS[COMPILE_EVENT] - self._start[COMPILE_EVENT]
        if exc_type is None and self.strict and (self.traces or self.compiles):
            raise RecompilationError(
                f"{self.label}: {self.traces} trace(s) and {self.compiles} compilation(s) "
                "happened inside the timed loop."
            )


def total_compile_events() -> tuple[int, int]:
    """(traces, compilations) recorded since the listener was installed."""
    _install_listener()
    return _EVENT_COUNTS[TRACE_EVENT], _EVENT_COUNTS[COMPILE_EVENT]


@dataclass(frozen=True)
class MemoryStats:
    """XLA's compiled memory analysis of one executable, in bytes.

    ``argument``/``output`` are the sizes of the executable's input and output
    buffers, ``alias`` the part of the output that reuses (donated) input
    buffers, ``temp`` the scratch buffers XLA allocates for intermediates.
    ``total = argument + output + temp - alias`` is what the executable holds
    at once at most (XLA's buffer assignment, before any runtime allocator
    effects); it is the number the benchmarks report and compare.
    """

    argument: int
    output: int
    alias: int
    temp: int

    @property
    def total(self) -> int:
        return self.argument + self.output + self.temp - self.alias

    @classmethod
    def of(cls, compiled: Any) -> MemoryStats | None:
        analysis = compiled.memory_analysis()
        if analysis is None:  # some backends do not implement it
            return None
        return cls(
            argument=int(analysis.argument_size_in_bytes),
            output=int(analysis.output_size_in_bytes),
            alias=int(analysis.alias_size_in_bytes),
            temp=int(analysis.temp_size_in_bytes),
        )


@dataclass(frozen=True)
class CompiledStep:
    """A jitted step compiled ahead of time, with XLA's analyses of it.

    Attributes:
      fn: the jitted function; calling it with arguments of the compiled shapes
        and dtypes reuses the compiled executable (no trace, no compilation).
      memory: XLA's compiled memory analysis (None if the backend has none).
      flops: XLA's cost-analysis estimate of the floating-point operations of
        one call (None if unavailable): a machine-independent companion to the
        measured times.
      seconds: wall time of lowering and compiling.
    """

    fn: Callable[..., Any]
    memory: MemoryStats | None
    flops: float | None
    seconds: float


def compile_step(
    step: Callable[..., Any], *args: Any, donate_argnums: Sequence[int] = (0,)
) -> CompiledStep:
    """Jits ``step`` and compiles it ahead of time for ``args``.

    The compiled executable lands in jit's cache, so calling the returned jitted
    function with arguments of the same shapes and dtypes neither traces nor
    compiles again (the timed loops check this with :class:`CompileCounter`).
    ``donate_argnums`` donates the carried state (parameters, optimizer states)
    as a training loop would, so outputs reuse the input buffers.
    """
    jitted = jax.jit(step, donate_argnums=tuple(donate_argnums))
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    seconds = time.perf_counter() - start
    try:
        cost = compiled.cost_analysis()
        if isinstance(cost, (list, tuple)):  # older jax: one dict per device
            cost = cost[0] if cost else None
        flops = float(cost["flops"]) if cost and "flops" in cost else None
    except Exception:  # noqa: BLE001 - an analysis a backend lacks is reported as n/a
        flops = None
    return CompiledStep(jitted, MemoryStats.of(compiled), flops, seconds)


def fresh_copy(tree: Any) -> Any:
    """A copy of the arrays of ``tree``, so donating it leaves the caller's arrays valid.

    Copied through host memory rather than with ``x.copy()``, which would
    compile one small XLA program per array shape.
    """

    def copy(x):
        if not isinstance(x, jax.Array):
            return x
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = np.array(jax.random.key_data(x))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        return jax.device_put(np.array(x))

    return jax.tree.map(copy, tree)


def _one_call(step: Callable[..., Any], carry: Any, args: Sequence[Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    carry = jax.block_until_ready(step(carry, *args))
    return carry, time.perf_counter() - start


def time_steps(
    step: Callable[..., Any],
    carry: Any,
    args: Sequence[Any] = (),
    *,
    warmup: int = 2,
    repeats: int = 10,
    max_seconds: float | None = None,
    label: str = "step",
) -> list[float]:
    """Times ``carry = step(carry, *args)``: one wall time in seconds per call.

    ``warmup`` untimed calls come first; then ``repeats`` timed calls (fewer if
    ``max_seconds`` of timed calls have elapsed, but at least 3), each followed by
    ``block_until_ready``. No trace or compilation may happen in the timed calls.
    """
    carry = fresh_copy(carry)
    for _ in range(warmup):
        carry, _ = _one_call(step, carry, args)
    times: list[float] = []
    with CompileCounter(label):
        while len(times) < repeats:
            carry, seconds = _one_call(step, carry, args)
            times.append(seconds)
            if max_seconds is not None and len(times) >= 3 and sum(times) > max_seconds:
                break
    return times


def time_interleaved(
    entries: dict[str, tuple[Callable[..., Any], Any, Sequence[Any]]],
    *,
    warmup: int = 2,
    rounds: int = 10,
    label: str = "interleaved",
) -> dict[str, list[float]]:
    """Times several steps in alternating rounds: one call of each per round.

    Ratios between steps measured this way are robust to slow drifts of the
    machine's load (every step sees the same conditions, in rotating order).

    Args:
      entries: name -> (step, carry, args) with ``carry = step(carry, *args)``.
      warmup: untimed calls of each step first.
      rounds: timed calls of each step.
      label: used in the recompilation error message.

    Returns:
      name -> list of per-call wall times in seconds.
    """
    carries = {name: fresh_copy(carry) for name, (_, carry, _) in entries.items()}
    names = list(entries)
    for name in names:
        step, _, args = entries[name]
        for _ in range(warmup):
            carries[name], _ = _one_call(step, carries[name], args)
    times: dict[str, list[float]] = {name: [] for name in names}
    with CompileCounter(label):
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                step, _, args = entries[name]
                carries[name], seconds = _one_call(step, carries[name], args)
                times[name].append(seconds)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def machine_info() -> dict[str, str]:
    """The machine and software a benchmark ran on."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    info = {
        "cpu": _cpu_model(),
        "cpu count": f"{os.cpu_count()} (usable by this process: {usable})",
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "jaxlib": _version("jaxlib"),
        "optax": _version("optax"),
        "backend": f"{jax.default_backend()} ({', '.join(str(d) for d in jax.devices())})",
    }
    if hasattr(os, "getloadavg"):
        info["load average (1, 5, 15 min)"] = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    flags = os.environ.get("XLA_FLAGS")
    if flags:
        info["XLA_FLAGS"] = flags
    return info


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - a missing optional package is not an error
        return "not installed"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def print_machine_info(extra: dict[str, str] | None = None) -> None:
    """Prints :func:`machine_info` (plus ``extra``) as a markdown list."""
    info = machine_info()
    info.update(extra or {})
    print("Machine:")
    for key, value in info.items():
        print(f"- {key}: {value}")
    print()


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; numbers should already be formatted as strings."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda row: (
        "| " + " | ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) + " |"
    )
    sep = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in cells)])


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_seconds(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"

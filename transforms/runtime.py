"""Worker-side tuning shared by the stateful DoFns."""

from __future__ import annotations

import gc
import os
from typing import Any

_TUNED = False
_GC_TUNED = False
GC_YOUNG_THRESHOLD = 10_000
GC_TUNING_ENV = "FRESHREC_GC_TUNING"  # "0" keeps the interpreter's collector settings


def tune_worker() -> None:
    """Both tunings below; what the stateful DoFns call in ``setup``. Idempotent; per process."""
    tune_state_cache_sizing()
    tune_garbage_collector()


def tune_garbage_collector(young_threshold: int = GC_YOUNG_THRESHOLD) -> None:
    """Make CPython's cyclic garbage collector cheaper for a worker that moves many small objects.

    Every micro-batch allocates thousands of dicts and lists (decoded events, feature lists, records),
    most of which live for the length of a bundle. With the default generation-0 threshold (700
    allocations) they trigger a young collection every few events and are promoted into older
    generations, whose collections walk everything the process holds, torch's and Beam's module
    objects included: 10-15% of a local run's time (bench/throughput.py, GC on vs tuned). So, once per
    process: collect, freeze what survives (the imported modules and the pipeline's objects, which are
    never garbage) out of the collector's reach (``gc.freeze``), and raise the generation-0 threshold
    to ``young_threshold``. Reference counting still frees acyclic garbage at once; cycles are still
    collected, less often. ``FRESHREC_GC_TUNING=0`` in the worker's environment leaves the collector as it is."""
    global _GC_TUNED
    if _GC_TUNED or os.environ.get(GC_TUNING_ENV, "1") == "0":
        return
    gc.collect()
    gc.freeze()
    g0, g1, g2 = gc.get_threshold()
    if g0 and g0 < young_threshold:  # 0 = collection disabled by the user: leave it so
        gc.set_threshold(young_threshold, g1, g2)
    _GC_TUNED = True


def tune_state_cache_sizing() -> None:
    """Make Beam's state-cache weighing cheap.

    The Python SDK weighs every value it puts in its state cache with ``objsize.get_deep_size``,
    whose default first collects the ids of every loaded module's globals. With torch imported
    that is ~1 ms per state write and dominated local runs (70% of CPU in a profile of the
    DirectRunner). Our state values (dicts, lists, bytes, ints) never reference module globals,
    so skipping that exclusion leaves their measured sizes unchanged. Idempotent; per process.
    """
    global _TUNED
    if _TUNED:
        return
    try:
        import objsize
    except ImportError:  # older SDKs do not weigh with objsize
        _TUNED = True
        return
    objsize.default_settings.update(exclude_modules_globals=False)
    _TUNED = True


_METRICS_PATCHED = False


def keep_runner_metrics_bounded() -> None:
    """Stop the DirectRunner's engine (Beam's ``FnApiRunner``) from holding every bundle's metrics.

    ``FnApiRunner.run_stages`` folds each bundle's monitoring infos into the running totals with
    ``apache_beam.metrics.monitoring_infos.consolidate``, which is a generator: the totals it keeps are a
    chain of unconsumed generators, one per bundle, each holding its bundle's response protobuf until the
    run ends. A batch run has few bundles; a stream read in chunks has one per chunk per step, so its
    memory grew with its input (about 150 bytes per event, measured in ``bench/memory.py``). Consolidating
    into a list at each bundle keeps the same totals in memory that stays flat. Idempotent; per process."""
    global _METRICS_PATCHED
    if _METRICS_PATCHED:
        return
    try:
        from apache_beam.metrics.monitoring_infos import consolidate
        from apache_beam.runners.portability.fn_api_runner import fn_runner
    except ImportError:  # another SDK layout: nothing to patch
        _METRICS_PATCHED = True
        return
    if getattr(fn_runner, "consolidate_monitoring_infos", None) is consolidate:
        fn_runner.consolidate_monitoring_infos = _consolidated  # type: ignore[attr-defined]
    _METRICS_PATCHED = True


def _consolidated(metrics: Any, key: Any = None) -> list[Any]:
    """Beam's ``consolidate`` into a list, with one value per gauge: the one set last. (Beam has no combiner
    for gauges, so it kept every bundle's value, newest bundle first, and its results then reported the
    oldest: a run's ``model_version_shard_N`` gauge read 1 at the end of a stream.)"""
    from apache_beam.metrics import monitoring_infos as mi

    out: list[Any] = []
    gauges: dict[Any, tuple[float, Any]] = {}
    for info in mi.consolidate(metrics) if key is None else mi.consolidate(metrics, key):
        if not mi.is_gauge(info):
            out.append(info)
            continue
        k = mi.to_key(info) if key is None else key(info)
        at = mi.extract_gauge_value(info)[0]
        if k not in gauges or at >= gauges[k][0]:
            gauges[k] = (at, info)
    return out + [info for _, info in gauges.values()]


_TIMERS_PATCHED = False


def keep_each_steps_timers_apart() -> None:
    """Stop the DirectRunner's engine (Beam's ``FnApiRunner``) from handing one step's timers to another.

    It buffers the timers a bundle sets by timer name only (apache/beam#21995), so in a stage that fuses two
    steps with a timer of the same name, the first step takes both steps' timers (the last set per key wins)
    and the other's never fire. Here: ``DedupeEvents`` and the two ``AnnotateFeatures`` (``group_idle``, of
    ``KeyGroupStep``): in a 40,000-event stream the first fired 20,424 timers, the others none. Buffering
    them by (name, step) gives each step its own. Idempotent; per process."""
    global _TIMERS_PATCHED
    if _TIMERS_PATCHED:
        return
    _TIMERS_PATCHED = True
    try:
        from apache_beam.runners.portability.fn_api_runner.execution import BundleContextManager, ListBuffer
        from apache_beam.runners.portability.fn_api_runner.translations import split_buffer_id
    except ImportError:  # another SDK layout: nothing to patch
        return
    shared = BundleContextManager.get_buffer

    def get_buffer(self: Any, buffer_id: bytes, transform_id: str) -> Any:
        kind, name = split_buffer_id(buffer_id)
        if kind != "timers":
            return shared(self, buffer_id, transform_id)
        buffers = self.execution_context.timer_buffers
        key = (buffer_id, transform_id)
        if key not in buffers:
            buffers[key] = ListBuffer(self.get_timer_coder_impl(transform_id, name))
        return buffers[key]

    BundleContextManager.get_buffer = get_buffer

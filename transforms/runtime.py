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


_DIRECT_METRICS_PATCHED = False


def count_every_bundle_on_the_streaming_direct_runner() -> None:
    """Make Beam's streaming DirectRunner (``BundleBasedDirectRunner``: Pub/Sub runs, processing-time timers)
    count every bundle's metrics, not only each worker thread's first bundle of a step.

    Its executor gives each bundle a new ``MetricsContainer`` and commits that container's values, but the
    worker thread's state sampler caches the step's scoped state, with the container of the first bundle
    it saw, by step name: later bundles on that thread count into that first container, which was committed
    long ago, and their own stay empty (a drained Pub/Sub run of 3,000 events reported 800 events in).
    Handing each worker thread one container per step, reset at the start of each bundle, makes the
    container the sampler counts into the one the executor commits. Idempotent; per process."""
    global _DIRECT_METRICS_PATCHED
    if _DIRECT_METRICS_PATCHED:
        return
    import threading

    from apache_beam.metrics.execution import MetricsContainer
    from apache_beam.runners.direct import executor

    local = threading.local()

    def container(step_name: str) -> MetricsContainer:
        cache = local.__dict__.setdefault("containers", {})
        found = cache.get(step_name)
        if found is None:
            found = cache[step_name] = MetricsContainer(step_name)
        else:
            found.reset()
        return found

    executor.MetricsContainer = container  # type: ignore[attr-defined]
    _DIRECT_METRICS_PATCHED = True


_SPECS_PATCHED = False


def inspect_each_dofn_class_once() -> None:
    """Make Beam's streaming DirectRunner find a DoFn's state and timer specs once per DoFn class, not per bundle.

    Its ParDo evaluator builds a new DoFn runner for every bundle, and each build asks
    ``userstate.get_dofn_specs``, which walks every method of the DoFn with ``inspect.signature``: over a third
    of the executor's busy time in a profile of a Pub/Sub run (py-spy). The specs are the defaults of the
    class's methods (``StateParam``/``TimerParam``), so they are the same for every instance of a class
    (for a wrapped callable, of that callable). Idempotent; per process."""
    global _SPECS_PATCHED
    if _SPECS_PATCHED:
        return
    from apache_beam.runners.direct import transform_evaluator
    from apache_beam.transforms import userstate

    original = userstate.get_dofn_specs
    cache: dict[Any, tuple[set[Any], set[Any]]] = {}

    def get_dofn_specs(dofn: Any) -> tuple[set[Any], set[Any]]:
        key = (type(dofn), getattr(dofn, "_fn", None))
        try:
            found = cache.get(key)
        except TypeError:  # an unhashable wrapped callable
            return original(dofn)
        if found is None:
            found = cache[key] = original(dofn)
        return set(found[0]), set(found[1])

    userstate.get_dofn_specs = get_dofn_specs
    transform_evaluator.get_dofn_specs = get_dofn_specs  # type: ignore[attr-defined]
    _SPECS_PATCHED = True

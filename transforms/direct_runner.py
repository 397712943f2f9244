"""How Beam's streaming DirectRunner is made to run this pipeline at thousands of events a second.

The streaming DirectRunner (``BundleBasedDirectRunner``: Pub/Sub runs, processing-time timers) is built for
tests: per bundle of every step it unpickles a fresh copy of the DoFn, sets it up and tears it down, walks
its methods for state and timer specs, and deep-copies each key's state it touches; after every bundle its
monitor asks every key of every stateful step for due timers. At 2,000 events/s this overhead, not the
learning, was most of a Pub/Sub run's time (py-spy). ``tune_streaming_direct_runner()`` applies the
patches below, each keeping the runner's semantics (a bundle's state commits or not as a whole, timers fire
as before); each is idempotent and per process. The batch DirectRunner (Beam's ``FnApiRunner``) is not
affected.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

_PATCHED: set[str] = set()


def tune_streaming_direct_runner() -> None:
    """Every patch of this module."""
    count_every_bundle_on_the_streaming_direct_runner()
    inspect_each_dofn_class_once()
    reuse_each_dofn_across_bundles()
    copy_keyed_state_without_deepcopy()
    ask_only_keys_with_timers_due()


def _once(name: str) -> bool:
    """True the first time ``name`` is asked for (then it is patched)."""
    if name in _PATCHED:
        return False
    _PATCHED.add(name)
    return True


def count_every_bundle_on_the_streaming_direct_runner() -> None:
    """Make the streaming DirectRunner count every bundle's metrics, not only each worker thread's first bundle
    of a step.

    Its executor gives each bundle a new ``MetricsContainer`` and commits that container's values, but the
    worker thread's state sampler caches the step's scoped state, with the container of the first bundle
    it saw, by step name: later bundles on that thread count into that first container, which was committed
    long ago, and their own stay empty (a drained Pub/Sub run of 3,000 events reported 800 events in).
    Handing each worker thread one container per step, reset at the start of each bundle, makes the
    container the sampler counts into the one the executor commits."""
    if not _once("metrics"):
        return
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


def inspect_each_dofn_class_once() -> None:
    """Find a DoFn's state and timer specs once per DoFn class, not per bundle.

    The ParDo evaluator builds a new DoFn runner for every bundle, and each build asks
    ``userstate.get_dofn_specs``, which walks every method of the DoFn with ``inspect.signature``: over a third
    of the executor's busy time in a profile of a Pub/Sub run (py-spy). The specs are the defaults of the
    class's methods (``StateParam``/``TimerParam``), so they are the same for every instance of a class
    (for a wrapped callable, of that callable)."""
    if not _once("specs"):
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


def reuse_each_dofn_across_bundles() -> None:
    """Set each DoFn up once and reuse it for bundle after bundle, as Beam's DoFn lifecycle allows and
    production runners do, instead of a fresh unpickled copy set up and torn down around every bundle.

    The ParDo evaluator round-trips the step's DoFn through the pickler per bundle (a test that it pickles)
    and runs its ``setup`` and ``teardown`` around each: a Pub/Sub client per bundle of a publishing step,
    a learner's first-flush imports per bundle of the update step. Here each worker thread keeps one
    round-tripped copy per DoFn (so the test still runs, once), whose ``setup`` runs on its first bundle;
    ``teardown`` is left to the end of the process (Beam does not promise it)."""
    if not _once("dofns"):
        return
    from apache_beam.internal import pickler
    from apache_beam.runners.direct import transform_evaluator

    local = threading.local()

    def reusable(copy: Any) -> Any:
        """``copy`` with a ``setup`` that runs once and a ``teardown`` that does not run per bundle (the DoFn
        runner calls the instance's attributes)."""
        setup, done = copy.setup, []

        def setup_once() -> None:
            if not done:
                setup()
                done.append(True)

        copy.setup, copy.teardown = setup_once, lambda: None
        return copy

    class ReusedDoFns:
        """``pickler`` to the ParDo evaluator, whose ``roundtrip`` hands a thread the same copy each time."""

        def __getattr__(self, name: str) -> Any:
            return getattr(pickler, name)

        @staticmethod
        def roundtrip(dofn: Any) -> Any:
            copies = local.__dict__.setdefault("copies", weakref.WeakKeyDictionary())
            try:
                found = copies.get(dofn)
            except TypeError:  # unhashable or not weakly referable: a fresh copy, as Beam's
                return pickler.roundtrip(dofn)
            if found is None:
                found = copies[dofn] = reusable(pickler.roundtrip(dofn))
            return found

    transform_evaluator.pickler = ReusedDoFns()  # type: ignore[attr-defined]


def copy_keyed_state_without_deepcopy() -> None:
    """Copy a key's state at the start of a bundle without ``copy.deepcopy`` of its timers.

    The runner copies each key's state a bundle touches, so that a bundle commits all of its writes or none
    (``InMemoryUnmergedState.copy``), and deep-copies the timers: their windows and timestamps, which are
    never mutated (a timer is set by replacing its entry). Copying the dictionaries alone is the same
    isolation: a third of the time of the keyed steps in a profile of a 2,000 events/s run."""
    if not _once("state_copy"):
        return
    import copy

    from apache_beam.transforms import trigger

    def copy_state(self: Any) -> Any:
        cloned = trigger.InMemoryUnmergedState(defensive_copy=self.defensive_copy)
        for window, timers in self.timers.items():
            cloned.timers[window] = dict(timers)
        cloned.global_state = copy.deepcopy(self.global_state) if self.global_state else {}
        for window, tags in self.state.items():
            for tag, values in tags.items():
                cloned.state[window][tag] = copy.copy(values)
        return cloned

    trigger.InMemoryUnmergedState.copy = copy_state  # type: ignore[method-assign]


def ask_only_keys_with_timers_due() -> None:
    """Ask a key's state for due timers only when one may be due.

    After every bundle, and in a loop while idle, the runner's monitor asks every key's state of every
    stateful step for due timers, so its cost grows with the keys the steps have seen: each key group of
    the keyed steps holds a watermark timer a day ahead (the dedupe TTL), and a 2,000 events/s run spent
    13% of its time there. A bundle never changes a key's state in place: it writes a copy, which its
    commit puts in place of the old one. So for each key this remembers the state object it last asked
    and that state's earliest watermark timer, and asks again only once the state was replaced, the input
    watermark reached that timer, or the state holds a processing-time timer (due by the clock)."""
    if not _once("timers"):
        return
    from apache_beam.runners.direct import watermark_manager
    from apache_beam.runners.direct.util import TimerFiring
    from apache_beam.transforms.timeutil import TimeDomain
    from apache_beam.utils.timestamp import MAX_TIMESTAMP

    def earliest(state: Any) -> tuple[int, bool]:
        """The earliest watermark timer of ``state`` in micros (MAX_TIMESTAMP's: none), and whether it has a
        processing-time timer."""
        first, clock = MAX_TIMESTAMP.micros, False
        for timers in state.timers.values():
            for (_, domain, _), at in timers.items():
                if domain == TimeDomain.WATERMARK:
                    first = min(first, at.micros)
                else:
                    clock = True
        return first, clock

    def extract_transform_timers(self: Any) -> tuple[list[Any], bool]:  # Beam's, asking only where one may be due
        with self._lock:
            asked = self.__dict__.setdefault("_freshrec_asked", {})  # key -> (state, earliest watermark timer, clock)
            fired, has_realtime_timer = [], False
            watermark = self._input_watermark
            now = watermark.micros  # integers: Timestamp's comparisons cost microseconds, and there are many keys
            for encoded_key, state in self._keyed_states.items():
                known = asked.get(encoded_key)
                if known is not None and known[0] is state and not known[2] and known[1] > now:
                    continue
                first, clock = earliest(state)
                asked[encoded_key] = (state, first, clock)
                if first > now and not clock:
                    continue
                timers, realtime = state.get_timers(watermark=watermark, processing_time=self._clock.time())
                has_realtime_timer = has_realtime_timer or realtime
                for window, (name, time_domain, timestamp, dynamic_timer_tag) in timers:
                    fired.append(TimerFiring(encoded_key, window, name, time_domain, timestamp,
                                             dynamic_timer_tag=dynamic_timer_tag))
            self._fired_timers.update(fired)
            return fired, has_realtime_timer

    watermark_manager._TransformWatermarks.extract_transform_timers = extract_transform_timers  # type: ignore[method-assign]

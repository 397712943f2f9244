"""The streaming DirectRunner as ``transforms.direct_runner`` tunes it: each DoFn set up once for many
bundles, and watermark timers of many keys firing exactly when the runner's own scan would fire them."""

from __future__ import annotations

from typing import Any

import apache_beam as beam
from apache_beam.coders import VarIntCoder
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing.test_stream import TestStream
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Timestamp

from tests.helpers import Collected, CollectTo
from transforms.direct_runner import tune_streaming_direct_runner


class CountLifecycle(beam.DoFn):
    """Counts (in ``Collected``) its set-ups, bundles and elements."""

    def setup(self):
        Collected.add("lifecycle/setup", 1)

    def start_bundle(self):
        Collected.add("lifecycle/bundle", 1)

    def process(self, element):
        yield element


class FireAt(beam.DoFn):
    """(key, fire at, s) -> sets the key's watermark timer there (a later element moves it); on firing,
    outputs (key, the timer's time, the watermark's step)."""

    AT = ReadModifyWriteStateSpec("at", VarIntCoder())
    TIMER = TimerSpec("fire", TimeDomain.WATERMARK)

    def process(self, element, at=beam.DoFn.StateParam(AT), timer=beam.DoFn.TimerParam(TIMER)):
        key, fire_s = element
        at.write(fire_s)
        timer.set(Timestamp(seconds=fire_s))

    @on_timer(TIMER)
    def fire(self, key=beam.DoFn.KeyParam, at=beam.DoFn.StateParam(AT)):
        yield key, at.read()


def _run(stream: TestStream, fn: beam.DoFn, key: str) -> list:
    tune_streaming_direct_runner()
    Collected.clear()
    opts = PipelineOptions()
    opts.view_as(StandardOptions).streaming = True
    with beam.Pipeline(options=opts) as p:
        p | stream | beam.ParDo(fn) | CollectTo(key)
    return Collected.get(key)


def test_a_dofn_is_set_up_once_for_many_bundles():
    stream = TestStream().advance_watermark_to(0)
    for i in range(5):
        stream = stream.add_elements([TimestampedValue(i, i)]).advance_watermark_to(i + 1)
    out = _run(stream.advance_watermark_to_infinity(), CountLifecycle(), "lifecycle/out")
    assert sorted(out) == [0, 1, 2, 3, 4]
    assert len(Collected.get("lifecycle/bundle")) >= 5
    assert len(Collected.get("lifecycle/setup")) == 1


def test_watermark_timers_of_many_keys_fire_once_each_when_the_watermark_reaches_them():
    # 300 keys, timers spread over 30 s; a second element moves key 7's timer earlier and key 8's later
    # (their states replaced after the scan has remembered them). All fire, once each, at the end of time.
    elements = [TimestampedValue((f"k{i}", 10 + i % 30), 0) for i in range(300)]
    stream = TestStream().advance_watermark_to(0).add_elements(elements)
    stream = stream.advance_watermark_to(5).add_elements([TimestampedValue(("k7", 6), 5), TimestampedValue(("k8", 35), 5)])
    for w in (12, 20, 30, 38):
        stream = stream.advance_watermark_to(w)
    out = _run(stream.advance_watermark_to_infinity(), FireAt(), "timers/out")
    fired_by = {key: at for key, at in out}
    assert len(out) == 300, "each key's timer fires exactly once"
    assert fired_by["k7"] == 6 and fired_by["k8"] == 35
    assert all(fired_by[f"k{i}"] == 10 + i % 30 for i in range(300) if i not in (7, 8))


def _state(*timers: tuple[str, str, float]):
    """A key's state as the runner keeps it, with (name, "watermark" or "clock", at seconds) timers."""
    from apache_beam.runners.direct.evaluation_context import DirectUnmergedState
    from apache_beam.transforms.window import GlobalWindow

    state = DirectUnmergedState()
    for name, domain, at_s in timers:
        state.set_timer(GlobalWindow(), name, TimeDomain.WATERMARK if domain == "watermark" else TimeDomain.REAL_TIME,
                        Timestamp(seconds=at_s))
    return state


def test_the_timer_scan_finds_what_is_due_at_each_watermark_and_sees_replaced_states():
    """The scan against explicit expectations, step by step: it may skip a key only while its state is
    the one it last saw and its earliest watermark timer is ahead."""
    from apache_beam.runners.direct.watermark_manager import _TransformWatermarks

    tune_streaming_direct_runner()
    now = [100.0]
    keyed = {b"a": _state(("t", "watermark", 10)), b"b": _state(("t", "watermark", 20)), b"c": _state()}
    marks = _TransformWatermarks(type("Clock", (), {"time": lambda self: now[0]})(), keyed, "step")

    def due(watermark_s: float) -> tuple[list[tuple[bytes, float]], bool]:
        marks._input_watermark = Timestamp(seconds=watermark_s)
        fired, clock = marks.extract_transform_timers()
        marks._fired_timers.clear()
        return sorted((f.encoded_key, f.timestamp.micros / 1e6) for f in fired), clock

    assert due(5) == ([], False)
    assert due(10) == ([(b"a", 10.0)], False)
    keyed[b"b"] = _state(("t", "watermark", 8))  # a bundle's commit replaces the state: an earlier timer
    assert due(10) == ([(b"a", 10.0), (b"b", 8.0)], False)
    keyed[b"a"], keyed[b"b"] = _state(), _state(("t", "watermark", 30))  # fired and cleared; moved later
    assert due(25) == ([], False)
    keyed[b"c"] = _state(("t", "clock", 150))  # a processing-time timer: asked each time, due by the clock
    assert due(25) == ([], True)
    now[0] = 150.0
    assert due(25) == ([(b"c", 150.0)], True)
    assert due(30) == ([(b"b", 30.0), (b"c", 150.0)], True)


class PassAndFireAt(beam.DoFn):
    """(key, fire at, s) -> passes it on and sets the key's watermark timer there (an earlier step's firing
    passes as it is); on firing, outputs (its ``name``, key, the timer's time) keyed "fired". Every
    instance's timer has one name."""

    AT = ReadModifyWriteStateSpec("at", VarIntCoder())
    TIMER = TimerSpec("fire", TimeDomain.WATERMARK)

    def __init__(self, name: str):
        self.name = name

    def process(self, element, at=beam.DoFn.StateParam(AT), timer=beam.DoFn.TimerParam(TIMER)):
        if element[0] != "fired":  # not an earlier step's firing
            at.write(element[1])
            timer.set(Timestamp(seconds=element[1]))
        yield element

    @on_timer(TIMER)
    def fire(self, key=beam.DoFn.KeyParam, at=beam.DoFn.StateParam(AT)):
        yield "fired", (self.name, key, at.read())


def test_two_fused_steps_with_a_timer_of_the_same_name_each_get_their_own_timers_on_the_batch_engine():
    # Beam's FnApiRunner (the batch DirectRunner) buffers a stage's timers by name only (apache/beam#21995):
    # unpatched, the first step fires both steps' timers and the second step's never fire.
    from transforms.runtime import keep_each_steps_timers_apart

    keep_each_steps_timers_apart()
    Collected.clear()
    with beam.Pipeline(options=PipelineOptions(runner="DirectRunner")) as p:
        fired = (p | beam.Create([("a", 10), ("b", 20)])
                 | "First" >> beam.ParDo(PassAndFireAt("first")).with_output_types(tuple[str, Any])
                 | "Second" >> beam.ParDo(PassAndFireAt("second")).with_output_types(tuple[str, Any])
                 | beam.Filter(lambda x: x[0] == "fired") | beam.Values())
        fired | CollectTo("fused_timers/out")
    assert sorted(Collected.get("fused_timers/out")) == [("first", "a", 10), ("first", "b", 20),
                                                          ("second", "a", 10), ("second", "b", 20)]

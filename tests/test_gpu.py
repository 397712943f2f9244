"""CUDA path of the learning core: skipped cleanly where no GPU is present (CI never has one).
Independent of Beam so it also runs on a bare GPU machine."""

from __future__ import annotations

import io

import pytest
import torch

from model.config import LearnerConfig, TableConfig
from model.learner import IncrementalLearner
from model.metrics import exact_auc

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")]


def stream(n):
    import random
    rng = random.Random(0)
    out = []
    for i in range(n):
        u = rng.randrange(50)
        out.append({"event_id": f"e{i}", "user_id": f"u{u}", "item_id": f"i{rng.randrange(20) * 4 + u % 4}",
                    "event_type": "click", "event_time_ms": 1_700_000_000_000 + i * 1000, "value": None,
                    "context": {}, "user_features": [0.0] * 11, "item_features": [0.0] * 3, "history": []})
    return out


def cfg(device):
    t = TableConfig(dim=8)
    return LearnerConfig(user_table=t, item_table=t, gate=True, gate_window=100, lr=0.1, negatives=3, device=device)


def test_cuda_learner_learns_and_its_checkpoint_loads_on_cpu():
    learner = IncrementalLearner(cfg("auto"))
    assert learner.device.type == "cuda"
    labels, probs = [], []
    events = stream(3000)
    for i in range(0, len(events), 50):
        r = learner.learn(events[i : i + 50])
        labels += r.labels
        probs += r.probs
    n = len(labels) // 4
    assert exact_auc(labels[-n:], probs[-n:]) > 0.75
    assert learner.users.weights.is_cuda and learner.items.weights.is_cuda
    for d in learner.take_deltas():
        assert not d.row_values.is_cuda and torch.isfinite(d.row_values).all()
    buf = io.BytesIO()
    torch.save(learner.state_dict(), buf)
    cpu = IncrementalLearner(cfg("cpu"))
    cpu.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True, map_location="cpu"))
    assert cpu.parameters_snapshot() == learner.parameters_snapshot()

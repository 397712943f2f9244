"""The runner-free core: cleaning, featurizing, readers, keyed state with TTL, and the one configuration.

Nothing here imports Beam or PyFlink (tests/test_settings.py checks it): the Beam adapters in
``transforms/`` and the PyFlink job in ``pipelines/flink_job.py`` are thin layers over it, and so
are the consumer, the publisher and the benchmarks. The learning core is ``model/``, runner-free too.
"""

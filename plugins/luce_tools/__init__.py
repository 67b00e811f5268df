"""luce's developer and offline tools, added to the ``luce`` command through the
``register_commands`` hook: benchmarks, quality checks, benchmark-model writers, drafter
training and CUDA profilers. Nothing in the runtime imports this package."""

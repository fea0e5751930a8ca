"""lotus_rt's benchmark suite: ``python -m benchmarks SCENARIO [--quick] [--out DIR]``.

Each scenario is a module of this package with ``main(argv) -> int`` (see ``__main__`` for the
table, ``common`` for the shared helpers); results go to ``benchmarks/out/`` as JSON + PNG.
"""

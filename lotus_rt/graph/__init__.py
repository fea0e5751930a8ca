"""The whole-model graph, torch-free: a captured model's ops over batched values (``ir``), the
ReLU epilogue rewrite (``fuse``), its lowering to tasks over batch tiles (``lower``) and the
programs that record it once and replay it at every step (``program``). ``lotus_rt.nn``
captures torch models into it; see ``lotus_rt.nn.whole_model``.
"""

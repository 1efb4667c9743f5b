"""Data: the demo task (:mod:`~rlhf.data.demo`), raw files -> Parquet splits (:mod:`~rlhf.data.prepare`),
checks before training (:mod:`~rlhf.data.validate`)."""

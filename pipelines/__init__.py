"""The Kubeflow pipeline of the RLHF stages and the tools around it.

* :mod:`pipelines.rlhf_pipeline`: the ``@dsl.pipeline`` DAG and its parameters;
* :mod:`pipelines.client`: compile, submit, schedule (KFP v2beta1 REST API);
* :mod:`pipelines.multinode`: Kubeflow Trainer TrainJob / PyTorchJob spec builder and launcher;
* ``rlhf run`` (the KFP local runner) lives in :mod:`rlhf.pipeline_run`.

Kept light: importing the package imports nothing heavy; import the submodules.
"""

"""Around the models: MLflow tracking (:mod:`~rlhf.mlops.tracking`), the model registry
(:mod:`~rlhf.mlops.registry`), DVC data versions (:mod:`~rlhf.mlops.versioning`) and the retrain
decision (:mod:`~rlhf.mlops.retrain`)."""

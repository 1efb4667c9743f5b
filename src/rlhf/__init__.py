"""rlhf: a production RLHF pipeline (prepare, validate, SFT, reward, PPO, evaluate, register).

Every stage is a plain function in this package; the CLI, the KFP components and
``dvc.yaml`` are thin doors into the same functions.
"""

__version__ = "0.1.0"

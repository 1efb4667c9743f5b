"""The pipeline: the stage table, the step runner, the KFP components and DAG, ``rlhf run`` (KFP local
runner), and submission to a cluster. See docs/architecture.md for the map.

Kept light: importing the package imports nothing heavy; import the submodules.
"""

"""The RLHF pipeline, for tools that take a pipeline file, e.g.

    kfp dsl compile --py pipelines/rlhf_pipeline.py --output pipeline.yaml

(``rlhf compile`` does the same with the images and params.yaml as options). The definition lives
in the package, :mod:`rlhf.pipeline.dag`; this file only names the pipeline for ``$RLHF_IMAGE``.
"""

from rlhf.pipeline.dag import make_pipeline

rlhf_pipeline = make_pipeline()

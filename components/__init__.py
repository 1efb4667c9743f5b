"""KFP components of the RLHF pipeline: one thin wrapper per stage around the ``rlhf`` library.

The components run in the image ``$RLHF_IMAGE`` (CPU steps) and ``$RLHF_GPU_IMAGE`` (training and
evaluation; default: the CPU tag with ``-cuda``), built from ``components/Dockerfile``. Build them
for another image with :func:`components.stages.build`.
"""

from components.stages import DEFAULT_GPU_IMAGE, DEFAULT_IMAGE, Components, build, default_images

__all__ = ["DEFAULT_IMAGE", "DEFAULT_GPU_IMAGE", "Components", "build", "default_images"]
